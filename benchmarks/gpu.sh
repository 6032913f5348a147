#!/usr/bin/env bash
# Run the benchmark suites (layer, flops, step, migu, profile, finegrained) in bfloat16 on a CUDA
# device, then an MFU table against the device's dense bf16 peak (data-sheet table in
# benchmarks/common.py: H100/H200 989 TFLOP/s, A100 312, ...; --peak-tflops overrides). Aimed at
# <= 5 minutes on one recent GPU (step compiles 5 models once: --no-compile skips that).
# Results: <out>/<suite>.{json,md}, <out>/mfu.{json,md} and <out>/env.txt.
#
#   bash benchmarks/gpu.sh                          # cuda, bfloat16 -> benchmarks/out/gpu
#   bash benchmarks/gpu.sh --device cpu --quick     # smoke-test this script on a CPU machine
#   bash benchmarks/gpu.sh --out /tmp/gpu --device cuda:1 --suites profile,step
#
# PYTHON selects the interpreter (default: .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DEVICE=cuda
DTYPE=bfloat16
OUT=benchmarks/out/gpu
QUICK=()
STEP_EXTRA=()
PEAK=""
SUITES=(layer flops step migu profile finegrained)
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --dtype) DTYPE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --quick) QUICK=(--quick); shift ;;
    --no-compile) STEP_EXTRA=(--no-compile); shift ;;
    --peak-tflops) PEAK="$2"; shift 2 ;;
    --suites) IFS=, read -r -a SUITES <<< "$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
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
  extra=()
  if [ "$suite" = step ]; then extra=(${STEP_EXTRA[@]+"${STEP_EXTRA[@]}"}); fi
  "$PYTHON" -m "benchmarks.$suite" --device "$DEVICE" --dtype "$DTYPE" --out "$OUT" \
    ${QUICK[@]+"${QUICK[@]}"} ${extra[@]+"${extra[@]}"}
done

echo "== mfu ($((SECONDS - START)) s)"
PYTHONPATH=. "$PYTHON" - "$OUT" "$PEAK" <<'PY'
"""MFU = model FLOP/s (3 x forward matmul FLOPs per token x tokens/s) / dense bf16 peak."""
import json
import sys
from pathlib import Path

from benchmarks.common import dense_bf16_peak, md_table

out, peak_arg = Path(sys.argv[1]), sys.argv[2]
rows, peak, name = [], None, None
for suite in ("profile", "step"):
    f = out / f"{suite}.json"
    if not f.exists():
        continue
    d = json.loads(f.read_text())
    name = d["machine"]["device_name"]
    peak = float(peak_arg) * 1e12 if peak_arg else dense_bf16_peak(name)
    if suite == "profile":
        for r in d["results"]:
            fl = r["step_flops"] / r["step"]["median_s"]
            rows.append([f"profile {r['label']}", f"{fl / 1e12:.2f}",
                         f"{r['dense_flops_per_s'] / 1e12:.1f}", f"{r['ceiling_fraction']:.1%}"])
    else:
        from rmoe.modeling.accounting import count_config
        from benchmarks.step import StepShape, build_rmoe
        s = StepShape(**d["settings"]["shape"])
        for r in d["rows"]:
            if not r["variant"].startswith("rmoe"):
                continue
            rt, p = ("linear", 128) if "SMoE" in r["variant"] else ("recurrent", int(r["variant"].split("P=")[1]))
            fwd = count_config(build_rmoe(s, rt, p).config, s.seq).forward_flops_per_token
            rows.append([f"step {r['variant']}", f"{3 * fwd * r['tokens_per_s'] / 1e12:.2f}", "", ""])
table = []
for label, tf, dense, frac in rows:
    mfu = f"{float(tf) * 1e12 / peak:.1%}" if peak else "peak unknown (--peak-tflops)"
    table.append([label, tf, dense, frac, mfu])
md = (f"MFU on {name}: dense bf16 peak {peak / 1e12:.0f} TFLOP/s\n\n" if peak else f"MFU on {name}\n\n")
md += md_table(["run", "model TFLOP/s", "measured matmul TFLOP/s", "of matmul", "MFU vs peak"], table)
(out / "mfu.md").write_text(md + "\n")
(out / "mfu.json").write_text(json.dumps({"device": name, "peak_flops_per_s": peak, "rows": table}, indent=2) + "\n")
print(md)
PY
echo "gpu.sh: done in $((SECONDS - START)) s; results in $OUT"
