"""Exploration (issue 26): dump the shipped model's out-of-fold outputs with its heatmaps and each localiser's own
points, to look for a level check. Not part of the product; the product's fit is `ccfnet fit-readout`.

    PYTHONPATH=. python experiments/grades/dump_oof.py  # writes runs/grades/oof-dump.npz
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ccfnet_core.datasets import read_dataset
from ccfnet_core.decode import decode, forward_tta
from ccfnet_core.evaluate import fold_checkpoint
from ccfnet_core.folds import load_folds
from ccfnet_core.geometry import from_input_space
from ccfnet_core.inference import Predictor, resize_input
from ccfnet_core.model import split_output

CHECKPOINT = Path("models/ccfnet-r18msc-loc2-refined-256-tianchi.pt")


def main() -> None:
    samples = [s for s in read_dataset(Path("/work/shared/data/tianchi-slices")) if not s.flag]
    folds = load_folds(Path("experiments/tianchi-folds.json"))
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ("points", "probs", "conf", "heat", "loc1", "loc2")}
    order = []
    for fold in range(4):
        predictor = Predictor.from_checkpoint(fold_checkpoint(CHECKPOINT, fold), "cpu")
        pair = predictor.model.network.network
        members = [i for i, s in enumerate(samples) if folds[s.study_id] == fold]
        for i in members:
            sample = samples[i]
            pred = predictor.predict([sample.image])[0]
            batch = resize_input(sample.image, 256)
            with torch.no_grad():
                heat = split_output(forward_tta(pair, batch))[0][0].numpy()
                own = []
                for loc in (pair.localiser, pair.extra_localisers[0]):
                    pts, _, _ = decode(forward_tta(loc, batch), 16)
                    own.append(from_input_space(pts[0], sample.height, sample.width, 256))
            rows["points"].append(pred.points)
            rows["probs"].append(pred.probabilities)
            rows["conf"].append(pred.confidences)
            rows["heat"].append(heat)
            rows["loc1"].append(own[0])
            rows["loc2"].append(own[1])
            order.append(i)
            if len(order) % 10 == 0:
                print(len(order), flush=True)
        print("fold", fold, "done", flush=True)
    idx = np.array(order)
    back = np.argsort(idx)
    out = {k: np.stack(v)[back] for k, v in rows.items()}
    Path("runs/grades").mkdir(parents=True, exist_ok=True)
    np.savez(
        "runs/grades/oof-dump.npz",
        ids=np.array([s.study_id for s in samples]),
        fold=np.array([folds[s.study_id] for s in samples]),
        truth=np.stack([s.points for s in samples]),
        labels=np.array([[",".join(sorted(ls)) for ls in s.labels] for s in samples]),
        spacing=np.array([s.spacing_mm for s in samples]),
        hw=np.array([(s.height, s.width) for s in samples]),
        **out,
    )


if __name__ == "__main__":
    main()
