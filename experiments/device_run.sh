#!/usr/bin/env bash
# The whole GPU experiment in one call (issue 6): plan the variants that fit, 4-fold CV + final fit each,
# out-of-fold report, inference timing, and the best variant's checkpoints copied to $OUT.
# Run from the repository root on the device machine with .whl (pydicom) and .data/tianchi-slices carried.
# $OUT returns at most 8 files of 16 MiB: a variant's five models fit, a pair's (two networks each) do not, so for
# a pair the localiser's models come back, and `FETCH=<variant> bash experiments/device_run.sh` in a second call on
# the still-warm machine returns another variant's; `ccfnet pair --folds 4` then rebuilds the pair here.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
PY=${PY:-python3}
copy_models() {  # a variant's final model and fold models -> $OUT
  cp "runs/gpu/$1/final.pt" "$OUT/final.pt"
  for k in 0 1 2 3; do cp "runs/gpu/$1/final.folds/fold$k.pt" "$OUT/fold$k.pt"; done
  echo "models of $1 in \$OUT"
}
if [ -n "${FETCH:-}" ]; then copy_models "$FETCH"; exit; fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
CONFIG=${CONFIG:-experiments/tianchi-cv.toml}
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
  sources=$("$PY" -c "import pathlib, sys; from ccfnet_core.experiment import load_pairs; \
p = load_pairs(pathlib.Path(sys.argv[1])).get(sys.argv[2]); print(p['localiser'], p['classifier'], p['logits']) if p else None" \
    "$CONFIG" "$best")
  if [ -z "$sources" ]; then
    copy_models "$best"
  else
    set -- $sources
    if [ -f "runs/gpu/$1/final.pt" ]; then copy_models "$1"; fi
    echo "best is the pair $best: localiser $1, classifier $2, logits $3 (ccfnet pair ... --logits $3 --folds 4)"
    if [ -f "runs/gpu/$2/final.pt" ]; then echo "next call at once: FETCH=$2 bash experiments/device_run.sh"; fi
  fi
  "$PY" bench/inference.py --checkpoint "runs/gpu/$best/final.pt" --repeat 30 2>&1 | tee "$OUT/inference.txt"
fi
tar czf "$OUT/results.tgz" --exclude='state.pt' --exclude='*.pt' runs/gpu
echo "== summary =="
grep -A10 '^variant' "$OUT/experiment.log" || echo "no table"
cat "$OUT/inference.txt" 2>/dev/null
