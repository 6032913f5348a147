#!/usr/bin/env bash
# Run the benchmark suites (layer, flops, step, migu) in bfloat16 on a CUDA device; about 2-4 minutes
# on one recent GPU. Results: <out>/{layer,flops,step,migu}.{json,md} plus <out>/env.txt.
#
#   bash benchmarks/gpu.sh                          # cuda, bfloat16 -> benchmarks/out/gpu
#   bash benchmarks/gpu.sh --device cpu --quick     # smoke-test this script on a CPU machine
#   bash benchmarks/gpu.sh --out /tmp/gpu --device cuda:1
#
# PYTHON selects the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DEVICE=cuda
DTYPE=bfloat16
OUT=benchmarks/out/gpu
QUICK=()
SUITES=(layer flops step migu)
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --dtype) DTYPE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --quick) QUICK=(--quick); shift ;;
    --suites) IFS=, read -r -a SUITES <<< "$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT"

# Environment record; fail early (before any suite) when the device is not usable.
"$PYTHON" - "$DEVICE" "$DTYPE" > "$OUT/env.txt" <<'PY'
import sys

import torch

device, dtype = sys.argv[1], sys.argv[2]
print("torch", torch.__version__, "cuda", torch.version.cuda)
if device.startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit("gpu.sh: CUDA requested but torch.cuda.is_available() is False")
    d = torch.device(device)
    print("device", torch.cuda.get_device_name(d), "capability", torch.cuda.get_device_capability(d))
from rmoe.modeling.experts import auto_backend, grouped_mm_unsupported_reason

x = torch.zeros(8, 8, device=device, dtype=getattr(torch, dtype))
print("auto backend:", auto_backend(x, x), "| grouped_mm:", grouped_mm_unsupported_reason(x, x) or "ok")
PY
cat "$OUT/env.txt"

START=$SECONDS
for suite in "${SUITES[@]}"; do
  echo "== $suite ($((SECONDS - START)) s)"
  "$PYTHON" -m "benchmarks.$suite" --device "$DEVICE" --dtype "$DTYPE" --out "$OUT" ${QUICK[@]+"${QUICK[@]}"}
done
echo "gpu.sh: done in $((SECONDS - START)) s; results in $OUT"
