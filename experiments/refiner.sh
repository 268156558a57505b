#!/usr/bin/env bash
# The point refiner (issue 6; ccfnet_core.refiner, docs/model.md "Point refiner"), one command: train the refiner
# of each fold on the true points of the studies outside it and a final one on all 155 usable studies (refiners
# that exist are kept, so a stopped run continues), attach them fold by fold to the graded pair, score it out of
# fold, record the numbers in its card and print the table last. No network is trained here.
# CPU: about 3.5 min per refiner on 2 cores (18 min in all); then about 1 min to attach and score.
#   bash experiments/refiner.sh            # DATA=../shared/data/tianchi-slices by default
set -euo pipefail
cd "$(dirname "$0")/.."
CCFNET=${CCFNET:-.venv/bin/ccfnet}
DATA=${DATA:-../shared/data/tianchi-slices}
FOLDS=experiments/tianchi-folds.json
NETWORK=${NETWORK:-models/ccfnet-r18msc-graded-256-tianchi.pt}
REFINER=${REFINER:-models/candidates/refiner/refiner-seed0.pt}
OUT_MODEL=${OUT_MODEL:-models/candidates/refiner/refined.pt}
"$CCFNET" train-refiner --data "$DATA" --folds "$FOLDS" --out "$REFINER" --seed 0
"$CCFNET" attach-refiner --network "$NETWORK" --refiner "$REFINER" --out "$OUT_MODEL" --folds 4
"$CCFNET" evaluate --data "$DATA" --checkpoint "$OUT_MODEL" --folds "$FOLDS" --record-in-card \
  --out runs/evaluate-refined --json > runs/evaluate-refined.json
"$CCFNET" evaluate --data "$DATA" --checkpoint "$NETWORK" --folds "$FOLDS" --out runs/evaluate-network --json \
  > runs/evaluate-network.json
python3 - <<'PY'
import json
rows = [("without the refiner", "runs/evaluate-network.json"), ("with the refiner", "runs/evaluate-refined.json")]
keys = ("L-Disc", "L-Vertebra", "C-Disc", "C-Vertebra", "Score")
print(f"{'4-fold out of fold':<24}" + "".join(f"{k:>12}" for k in keys) + f"{'macroF1':>10}{'median mm':>11}")
for name, path in rows:
    m = json.load(open(path))
    print(f"{name:<24}" + "".join(f"{m[k]:>12.2f}" for k in keys)
          + f"{100 * m['challenge_macro_f1']:>10.1f}{m['median_error_mm']:>11.2f}")
PY
