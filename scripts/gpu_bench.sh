#!/usr/bin/env bash
# One-shot GPU benchmark for a session that has a CUDA machine (nothing is downloaded).
#   bash scripts/gpu_bench.sh            # results under $OUT (or ./gpu_bench_out)
# Runs `tilevlm bench --device cuda` four ways: bf16 eager, bf16 with the compiled
# (CUDA-graph) decode step, bf16 with compiled training blocks, int8 weights + compiled decode;
# plus the fast-path tests (the CUDA-only one checks that the decode loop never syncs).
# Sized for one device call (10-minute command limit, 15 minutes of device time per session):
# each bench run is cut at $BUDGET seconds (default 110), five runs + tests < 10 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_bench_out}"
mkdir -p "$OUT"
PY=python3  # the device image's python3 holds a CUDA torch; our .venv (CPU torch) does not travel
[ -x .venv/bin/python ] && .venv/bin/python -c "import torch,sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null && PY=.venv/bin/python
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} > "$OUT/env.txt" 2>&1

run() {  # name, extra bench args...
  local name="$1"; shift
  echo "== $name: tilevlm bench --device cuda $*" | tee -a "$OUT/summary.txt"
  timeout "${BUDGET:-110}" "$PY" -m tilevlm.cli bench --preset original_small --device cuda --repeats 5 \
      --warmup 2 --json "$OUT/$name.json" "$@" >> "$OUT/summary.txt" 2>> "$OUT/$name.log"
  echo "   exit $?" >> "$OUT/summary.txt"
}

run bf16_eager --dtype bf16
run bf16_compiled --dtype bf16 --compile --parts prefill decode
run bf16_compile_train --dtype bf16 --compile-train --parts train
run int8_compiled --dtype bf16 --weights int8 --compile --parts prefill decode
run fp32_eager --dtype fp32 --parts train decode

timeout 90 "$PY" -m pytest tests/test_fastpath.py > "$OUT/test_fastpath.txt" 2>&1
echo "tests exit $?" >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
