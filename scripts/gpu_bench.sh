#!/usr/bin/env bash
# One-shot GPU benchmark for a session that has a CUDA machine (nothing is downloaded), sized for
# one device call: the 10-minute command limit (15 minutes of device time per session).
#   bash scripts/gpu_bench.sh            # everything under $OUT (or ./gpu_bench_out)
# What it measures, most important first (issue 18's targets; `tilevlm bench`, random weights,
# original_small, a 2x2 split + global tile):
#   decode_bf16       decode batch 1 and 8, bf16, compiled decode step (CUDA graphs), and the
#                     time to first token (prefill, eager)
#   cache_reuse       tests/test_decode_cache_reuse.py: on CUDA, later generate calls of a bucket
#                     replay the recorded CUDA graph (no re-capture)
#   train_b4          training step at batch 4, bf16 autocast, eager
#   train_big         training step at batch $BIG_BATCH, bf16, per-block compiled (for MFU)
#   mfu               FLOPs of one training step counted by torch's FlopCounterMode (same model,
#                     batch and loss as the bench), divided by the measured step time and the GPU's
#                     dense bf16 peak ($PEAK_TFLOPS, else from the GPU's name)
#   train_b4_compiled, preprocess, decode_fp32 (nanoVLM's fp32 figures), test_fastpath
# Every run has its own time cap, and a run that would end past $TOTAL seconds is skipped (and
# says so), so the script ends in time whatever hangs or compiles slowly.
# Overrides: PRESET (original_small), DEVICE (cuda), BIG_BATCH (64), TOTAL (540), PEAK_TFLOPS.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_bench_out}"
PRESET="${PRESET:-original_small}"
DEVICE="${DEVICE:-cuda}"
BIG_BATCH="${BIG_BATCH:-64}"
TOTAL="${TOTAL:-540}"
mkdir -p "$OUT"
PY=python3  # the device image's python3 holds a CUDA torch; our .venv (CPU torch) does not travel
[ -x .venv/bin/python ] && .venv/bin/python -c "import torch,sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
  nproc
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >> "$SUMMARY"

fits() {  # name, cap: true when the run can end before $TOTAL seconds
  if (( SECONDS + $2 > TOTAL )); then
    echo "== $1: skipped (${SECONDS}s used, cap $2s, total $TOTAL s)" | tee -a "$SUMMARY"
    return 1
  fi
}

bench() {  # name, cap seconds, extra bench args...
  local name="$1" cap="$2"; shift 2
  fits "$name" "$cap" || return 0
  echo "== $name: tilevlm bench --preset $PRESET --device $DEVICE $* (cap ${cap}s, at ${SECONDS}s)" | tee -a "$SUMMARY"
  timeout "$cap" "$PY" -m tilevlm.cli bench --preset "$PRESET" --device "$DEVICE" --repeats 5 \
      --warmup 2 --json "$OUT/$name.json" "$@" >> "$SUMMARY" 2>> "$OUT/$name.log"
  echo "   exit $? (${SECONDS}s)" >> "$SUMMARY"
}

tests() {  # name, cap seconds, test files...
  local name="$1" cap="$2"; shift 2
  fits "$name" "$cap" || return 0
  echo "== $name: pytest $* (cap ${cap}s, at ${SECONDS}s)" | tee -a "$SUMMARY"
  timeout "$cap" "$PY" -m pytest -p no:cacheprovider -rs "$@" > "$OUT/$name.txt" 2>&1
  echo "   exit $? (${SECONDS}s): $(tail -n 1 "$OUT/$name.txt")" >> "$SUMMARY"
}

mfu() {  # name, cap seconds, bench JSON files with a train part...
  local name="$1" cap="$2"; shift 2
  fits "$name" "$cap" || return 0
  echo "== $name: counted FLOPs per training step (cap ${cap}s, at ${SECONDS}s)" | tee -a "$SUMMARY"
  timeout "$cap" "$PY" - "$PRESET" "$DEVICE" "$@" > "$OUT/$name.txt" 2> "$OUT/$name.log" <<'EOF'
import json, os, sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from tilevlm.model.vlm import VisionLanguageModel
from tilevlm.bench.bench_config import BenchConfig
from tilevlm.bench.workload import synthetic_batch

preset, device, files = sys.argv[1], torch.device(sys.argv[2]), sys.argv[3:]
name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
# Dense bf16 tensor-core peaks (no sparsity): H100 / H200 SXM 989 TFLOPS, A100 312.
known = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}
peak = float(os.environ.get("PEAK_TFLOPS") or
             next((v for k, v in known.items() if k in name), "nan")) * 1e12
print(f"device {name}; dense bf16 peak {peak / 1e12:.1f} TFLOPS"
      f"{' (PEAK_TFLOPS)' if os.environ.get('PEAK_TFLOPS') else ''}")
for path in files:
    if not Path(path).is_file():
        print(f"{path}: missing (its bench run failed or was skipped)")
        continue
    train = json.loads(Path(path).read_text()).get("train")
    if not train:
        print(f"{path}: no train part")
        continue
    if "mfu" in train:  # the bench's own figure, once tilevlm/bench/speed.py counts FLOPs
        print(f"{path}: the bench's own MFU {100 * train['mfu']:.1f} %")
    bc = BenchConfig(preset=preset, train_batch=train["batch"], train_loss=train["loss"])
    torch.manual_seed(bc.seed)
    model = VisionLanguageModel(bc.model_config()).to(device).train()
    batch = synthetic_batch(model, bc.train_batch, bc.prompt_tokens, bc.answer_tokens, device,
                            bc.seed)
    # Forward + backward as the bench's step (the optimizer's elementwise work is not counted,
    # as MFU conventions go); an attention kernel without a FLOP formula would count 0.
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(**batch, return_logits=bc.train_loss != "labels")
        out.loss.backward()
    flops, seconds = counter.get_total_flops(), train["seconds_per_step"]
    print(f"{path}: batch {bc.train_batch}, {flops / 1e9:.1f} GFLOP per step (counted), "
          f"{1e3 * seconds:.1f} ms per step -> {flops / seconds / 1e12:.1f} TFLOP/s, "
          f"MFU {100 * flops / seconds / peak:.1f} %")
    del model, batch, out
    if device.type == "cuda":
        torch.cuda.empty_cache()
EOF
  echo "   exit $? (${SECONDS}s)" >> "$SUMMARY"
  cat "$OUT/$name.txt" >> "$SUMMARY"
}

bench decode_bf16 200 --dtype bf16 --compile --parts prefill decode
tests cache_reuse 100 tests/test_decode_cache_reuse.py
bench train_b4 60 --dtype bf16 --parts train --train-batch 4
bench train_big 140 --dtype bf16 --compile-train --parts train --train-batch "$BIG_BATCH"
mfu mfu 60 "$OUT/train_b4.json" "$OUT/train_big.json"
bench train_b4_compiled 120 --dtype bf16 --compile-train --parts train --train-batch 4
mfu mfu_b4_compiled 40 "$OUT/train_b4_compiled.json"
bench preprocess 45 --parts preprocess
bench decode_fp32 150 --dtype fp32 --compile --parts prefill decode
tests test_fastpath 120 tests/test_fastpath.py
# A compiled decode step that inductor kept off CUDA graphs says why in its log.
grep -h "skipping cudagraphs" "$OUT"/*.log 2>/dev/null | sort | uniq -c >> "$SUMMARY"
echo "done in ${SECONDS}s" >> "$SUMMARY"
cat "$SUMMARY"
