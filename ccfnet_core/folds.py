"""K-fold splits by a seed, not by file-listing order, saved to a file so every experiment reuses them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def make_folds(study_ids: Sequence[str], k: int, seed: int) -> dict[str, int]:
    """Assign each study a fold 0..k-1: sort the ids (so listing order cannot matter), shuffle by seed, deal."""
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    unique = sorted(set(study_ids))
    if len(unique) < k:
        raise ValueError(f"{len(unique)} studies cannot make {k} folds")
    order = np.random.default_rng(seed).permutation(len(unique))
    return {unique[j]: int(position % k) for position, j in enumerate(order)}


def save_folds(path: Path, folds: dict[str, int], k: int, seed: int, note: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"k": k, "seed": seed, "note": note, "folds": dict(sorted(folds.items()))}
    path.write_text(json.dumps(payload, indent=1) + "\n")


def load_folds(path: Path) -> dict[str, int]:
    """study id -> fold, from a file written by `save_folds`."""
    try:
        payload = json.loads(path.read_text())
        return {str(study): int(fold) for study, fold in payload["folds"].items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a folds file ({exc})") from exc
