#!/usr/bin/env bash
# The whole GPU experiment in one call (issue 6): plan the variants that fit, 4-fold CV + final fit each,
# out-of-fold report, inference timing, and the best variant's checkpoints copied to $OUT.
# Run from the repository root on the device machine with .whl (pydicom) and .data/tianchi-slices carried.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
"${PY:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
CONFIG=${CONFIG:-experiments/tianchi-cv.toml}
PY=${PY:-python3}
BUDGET=${BUDGET:-360}
DEADLINE=${DEADLINE:-470}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
"$PY" -m ccfnet_core.experiment --data .data/tianchi-slices --folds experiments/tianchi-folds.json \
  --config "$CONFIG" --out runs/gpu --parallel "${PARALLEL:-5}" \
  --budget-seconds "$BUDGET" --deadline-seconds "$DEADLINE" 2>&1 | tee "$OUT/experiment.log"
best=$("$PY" - <<'PY'
import json, pathlib
rows = [(json.loads(p.read_text())["Score"], p.parent.name) for p in pathlib.Path("runs/gpu").glob("*/cv_metrics.json")]
rows = [r for r in rows if r[0] == r[0]]
print(max(rows)[1] if rows else "")
PY
)
echo "best variant: ${best:-none}"
if [ -n "$best" ]; then
  cp "runs/gpu/$best/final.pt" "$OUT/final.pt"
  for k in 0 1 2 3; do cp "runs/gpu/$best/final.folds/fold$k.pt" "$OUT/fold$k.pt"; done
  "$PY" bench/inference.py --checkpoint "runs/gpu/$best/final.pt" --repeat 30 2>&1 | tee "$OUT/inference.txt"
fi
tar czf "$OUT/results.tgz" --exclude='state.pt' --exclude='*.pt' runs/gpu
echo "== summary =="
grep -A10 '^variant' "$OUT/experiment.log" || echo "no table"
cat "$OUT/inference.txt" 2>/dev/null
