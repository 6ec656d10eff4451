#!/usr/bin/env bash
# A short end-to-end check on this machine's GPUs: train under one layout with NCCL and one
# CUDA device per worker, save, reshard the checkpoint to another layout, resume from it,
# and compare the losses with the same job run unchanged in the second layout.
#
#   bash scripts/gpu-check.sh [WORKDIR]            # after bash scripts/setup.sh (CUDA torch)
#   DEVICE=cpu bash scripts/gpu-check.sh [WORKDIR]  # the same steps with gloo, to try the script
#
# Layouts by device count: 4 or more: tp=2,pp=2,dp=1 -> tp=1,pp=1,dp=4; 2 or 3:
# tp=2,pp=1,dp=1 -> tp=1,pp=1,dp=2; 1: save and resume in tp=1,pp=1,dp=1. Exits non-zero
# with one line when a step fails or the losses differ by more than TOLERANCE (relative;
# default 1e-3: on GPUs a layout change reorders floating-point reductions, so the losses
# agree closely, not bit for bit).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
TOLERANCE=${TOLERANCE:-1e-3}
PY=.venv/bin/python
SCALAI=.venv/bin/scalai
[ -x "$SCALAI" ] || { echo "gpu-check: run 'bash scripts/setup.sh' first (no .venv/bin/scalai)"; exit 2; }
WORK=${1:-$(mktemp -d "${TMPDIR:-/tmp}/scalai-gpu-check-XXXXXX")}
if [ -e "$WORK" ] && [ -n "$(ls -A "$WORK")" ]; then
  echo "gpu-check: $WORK is not empty; give a new or empty directory"; exit 2
fi
mkdir -p "$WORK"

if [ "$DEVICE" = cuda ]; then
  N=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
  [ "$N" -ge 1 ] || { echo "gpu-check: torch sees no CUDA device (torch.cuda.is_available() is False)"; exit 2; }
  $PY -c "import torch.distributed as d; assert d.is_nccl_available()" \
    || { echo "gpu-check: this torch has no NCCL backend"; exit 2; }
  $PY - <<'EOF'
import torch
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"gpu-check: cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB")
EOF
else
  N=${DEVICES:-4}
fi
if [ "$N" -ge 4 ]; then A=tp=2,pp=2,dp=1; B=tp=1,pp=1,dp=4
elif [ "$N" -ge 2 ]; then A=tp=2,pp=1,dp=1; B=tp=1,pp=1,dp=2
else A=tp=1,pp=1,dp=1; B=tp=1,pp=1,dp=1
fi
echo "gpu-check: $N $DEVICE devices; $A for steps 1-4, then $B for steps 5-8; files in $WORK"

COMMON=(--global-batch 8 --micro-batch 2 --device "$DEVICE")
step() { echo "gpu-check: $*"; "$@" > "$WORK/last.log" 2>&1 || { tail -20 "$WORK/last.log"; echo "gpu-check: FAILED: $*"; exit 1; }; }

step "$SCALAI" train --layout "$B" --steps 8 "${COMMON[@]}" --metrics "$WORK/unchanged.jsonl"
step "$SCALAI" train --layout "$A" --steps 4 "${COMMON[@]}" --metrics "$WORK/run.jsonl" --save "$WORK/a"
step "$SCALAI" inspect "$WORK/a/step-000004" --verify
step "$SCALAI" reshard "$WORK/a/step-000004" "$WORK/b" --to "$B"
step "$SCALAI" compare "$WORK/a/step-000004" "$WORK/b"
step "$SCALAI" train --layout "$B" --steps 8 "${COMMON[@]}" --resume "$WORK/b" --metrics "$WORK/run.jsonl" \
  --save "$WORK/final"
step "$SCALAI" plot "$WORK/run.jsonl" --reference "$WORK/unchanged.jsonl" -o "$WORK/loss.png"

$PY - "$WORK" "$TOLERANCE" <<'EOF'
import json, sys
work, tol = sys.argv[1], float(sys.argv[2])
rows = lambda name: {r["step"]: r["loss"] for r in map(json.loads, open(f"{work}/{name}"))}
run, ref = rows("run.jsonl"), rows("unchanged.jsonl")
if sorted(run) != list(range(1, 9)) or sorted(ref) != list(range(1, 9)):
    sys.exit(f"gpu-check: FAILED: steps run {sorted(run)}, unchanged {sorted(ref)}; expected 1-8 in both")
worst = max(abs(run[s] - ref[s]) / abs(ref[s]) for s in run)
print(f"gpu-check: largest relative loss difference to the unchanged run: {worst:.2e} (tolerance {tol:g})")
if worst > tol:
    sys.exit("gpu-check: FAILED: the resumed run's losses differ from the unchanged run's")
print(f"gpu-check: OK; loss curves in {work}/loss.png")
EOF
