#!/usr/bin/env bash
# Grades and probabilities a radiologist can weigh (issue 26; docs/model.md "Grades, calibration, operating points
# and the level check"), one command from the model shipped before it (the two-localiser refined model of commit
# c31b14e) to the shipped one:
#  1. the disc grade grader (ccfnet_core.disc_grades): 4 folds + a final one on all 155 usable studies, each on the
#     true disc points of the studies outside its fold (grade graders that exist are kept; `--fold` shares the work
#     between processes: about 5 min per grader alone on 2 CPU cores, 15-20 min when the cores are shared);
#  2. attached fold by fold beside the binary graders (int8, as the model it is added to; points and P(abnormal)
#     unchanged, so the paper's Score is the same model's);
#  3. the readout fitted out of fold into every card (calibration, operating points, grade rule, level check; fold
#     k's on the other folds' out-of-fold outputs, the shipped card's on all of them);
#  4. scored out of fold (each study by the fold model and the fold readout that never saw it), the numbers
#     recorded in the card.
#   bash experiments/grades.sh            # DATA=../shared/data/tianchi-slices by default
set -euo pipefail
cd "$(dirname "$0")/.."
CCFNET=${CCFNET:-.venv/bin/ccfnet}
DATA=${DATA:-../shared/data/tianchi-slices}
FOLDS=experiments/tianchi-folds.json
BASE=${BASE:-runs/grades/base/ccfnet-r18msc-loc2-refined-256-tianchi.pt}
GRADES=${GRADES:-models/candidates/disc-grade/grade-grader.pt}
OUT_MODEL=${OUT_MODEL:-models/ccfnet-r18msc-loc2-refined-256-tianchi.pt}
if [ ! -f "$BASE" ]; then  # the model before issue 26, with its fold models, from git
  mkdir -p "$(dirname "$BASE")/ccfnet-r18msc-loc2-refined-256-tianchi.folds"
  git show "c31b14e:models/ccfnet-r18msc-loc2-refined-256-tianchi.pt" > "$BASE"
  for K in 0 1 2 3; do
    git show "c31b14e:models/ccfnet-r18msc-loc2-refined-256-tianchi.folds/fold$K.pt" \
      > "$(dirname "$BASE")/ccfnet-r18msc-loc2-refined-256-tianchi.folds/fold$K.pt"
  done
fi
OMP_NUM_THREADS=1 "$CCFNET" train-grade-grader --data "$DATA" --folds "$FOLDS" --out "$GRADES" --fold 0 --fold 1 &
OMP_NUM_THREADS=1 "$CCFNET" train-grade-grader --data "$DATA" --folds "$FOLDS" --out "$GRADES" --fold 2 --fold 3 &
wait
"$CCFNET" train-grade-grader --data "$DATA" --folds "$FOLDS" --out "$GRADES" --fold -1
"$CCFNET" attach-grade-grader --model "$BASE" --grade-grader "$GRADES" --out "$OUT_MODEL" --folds 4 --int8
"$CCFNET" fit-readout --data "$DATA" --folds "$FOLDS" --checkpoint "$OUT_MODEL" > runs/grades/readout.json
"$CCFNET" evaluate --data "$DATA" --checkpoint "$OUT_MODEL" --folds "$FOLDS" --record-in-card \
  --out runs/grades/evaluate --json > runs/grades/evaluate.json
python3 - <<'PY'
import json
m = json.load(open("runs/grades/evaluate.json"))
ci = m["reading"]["intervals"]
for key in ("Score", "challenge_macro_f1", "ECE-Vertebra", "ECE-Disc", "sensitivity-Vertebra",
            "specificity-Vertebra", "sensitivity-Disc", "specificity-Disc", "level_check_flags_shifted",
            "level_check_flags_other"):
    estimate, low, high = ci[key]
    print(f"{key:<28}{estimate:10.3f}  [{low:.3f}, {high:.3f}]")
PY
