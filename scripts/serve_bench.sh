#!/usr/bin/env bash
# The serving load figures of docs/performance.md: one server at a time on 127.0.0.1, loaded by
# `tilevlm bench --serve` (1, 4, 8, 16 clients, an image each), then stopped.
#
#   scripts/serve_bench.sh tilevlm MODEL_DIR OUT.json [bench options...]
#   scripts/serve_bench.sh transformers MODEL_DIR OUT.json [bench options...]     # --continuous-batching
#   scripts/serve_bench.sh transformers-static MODEL_DIR OUT.json [bench options...]
#
# SERVE_ARGS adds options to `tilevlm serve` (default "--max-batch 16": 16 clients decode
# together; e.g. "--max-batch 8 --max-queue 16").
# TILEVLM (default .venv/bin/tilevlm) runs tilevlm; TRANSFORMERS (default `transformers`) is
# transformers' CLI from a venv with transformers[serving] and pillow (kept apart from
# tilevlm's). PORT (default 18400) is the server's port.
set -euo pipefail
kind=$1 model=$2 out=$3
shift 3
TILEVLM=${TILEVLM:-.venv/bin/tilevlm}
TRANSFORMERS=${TRANSFORMERS:-transformers}
PORT=${PORT:-18400}
SERVE_ARGS=${SERVE_ARGS:---max-batch 16}
log="${out%.json}.server.log"
case "$kind" in
  tilevlm) "$TILEVLM" serve --model "$model" --port "$PORT" $SERVE_ARGS >"$log" 2>&1 & ;;
  transformers) "$TRANSFORMERS" serve "$model" --host 127.0.0.1 --port "$PORT" --device cpu \
                  --continuous-batching >"$log" 2>&1 & ;;
  transformers-static) "$TRANSFORMERS" serve "$model" --host 127.0.0.1 --port "$PORT" \
                  --device cpu >"$log" 2>&1 & ;;
  *) echo "unknown server kind $kind" >&2; exit 2 ;;
esac
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
"$TILEVLM" bench --serve "http://127.0.0.1:$PORT" --json "$out" "$@"
# The server's peak resident memory (what "memory stays bounded" is read from).
grep -E 'VmHWM|VmRSS' "/proc/$server/status" || true
