"""Train the point refiner (`ccfnet_core.refiner`) fold by fold, and attach it to a network checkpoint.

As for the patch grader (`ccfnet_core.grading`): each fold's refiner learns from the true points of the studies
outside that fold and is saved as `<stem>.folds/fold<k>.pt` beside the final refiner (all usable studies); one that
exists is not trained again. `attach_refiner_with_folds` combines a network checkpoint (single, pair, graded) and
the refiner fold by fold into `<arch>-refined` checkpoints, so `ccfnet evaluate --folds` scores them out of fold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ccfnet_core.checkpoint import ModelCard, load_model, save_model
from ccfnet_core.grader import PATCH_LEVELS, PATCH_PIXELS, level_pixels
from ccfnet_core.model import RefinedCCFNet, refined_arch
from ccfnet_core.patch_training import (
    EpochData,
    Progress,
    attach_fold_by_fold,
    attached_sources,
    combined_card,
    fit_patch_model,
    load_patch_model,
    patch_model_card,
    train_folds,
)
from ccfnet_core.refiner import MM_PER_LEVEL, PointRefiner, RefinerJitter, training_patches
from ccfnet_core.sample import SliceSample
from ccfnet_core.structures import NUM_STRUCTURES

REFINER_ARCH = "point-refiner"


@dataclass(frozen=True)
class RefinerRecipe:
    """How a refiner is trained (the defaults are the recipe measured in docs/model.md)."""

    epochs: int = 30
    batch_size: int = 128
    max_lr: float = 2e-3
    weight_decay: float = 1e-2
    seed: int = 0
    jitter: RefinerJitter = field(default_factory=RefinerJitter)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(patch_pixels=PATCH_PIXELS, patch_levels=PATCH_LEVELS, loss="L1 on the patch coordinates",
                    optimiser="AdamW, one-cycle lr")
        return data


def _slice(sample: SliceSample) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(sample.image[1], dtype=np.float32))


def train_refiner(
    samples: Sequence[SliceSample], recipe: RefinerRecipe, progress: Progress | None = None
) -> PointRefiner:
    """A refiner trained on displaced true points of `samples` (fresh displacements every epoch)."""
    usable = [s for s in samples if s.present.sum() >= 2]
    if not usable:
        raise ValueError("no study with two annotated points to train the refiner on")
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    refiner = PointRefiner()
    images = [_slice(s) for s in usable]

    def epoch_data() -> EpochData:
        xs, ks, ys = [], [], []
        for image, sample in zip(images, usable, strict=True):
            patches, target, present = training_patches(image, sample.points, recipe.jitter, rng)
            keep = torch.from_numpy(present)
            xs.append(patches[keep])
            ks.append(torch.arange(NUM_STRUCTURES)[keep])
            ys.append(target[keep])
        return torch.cat(xs), torch.cat(ks), torch.cat(ys)

    def l1(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (predicted - target).abs().sum(dim=1).mean()

    points = sum(int(s.present.sum()) for s in usable)
    return fit_patch_model(refiner, epoch_data, l1, points, recipe, progress)


def held_out_error(refiner: PointRefiner, samples: Sequence[SliceSample], seed: int = 1) -> dict[str, float]:
    """Median distance (mm, 36 mm per level) to the true point before and after refining displaced true points.

    The displacement is the training jitter's (a fixed seed), so the numbers say how far the refiner pulls points in
    on studies it did not see, with no localiser involved.
    """
    rng = np.random.default_rng(seed)
    jitter = RefinerJitter()
    before, after = [], []
    for sample in samples:
        pts = sample.points
        present = sample.present
        if present.sum() < 2:
            continue
        mm = MM_PER_LEVEL / level_pixels(pts)
        shift = rng.normal(0.0, jitter.shift_mm / mm, size=pts.shape)
        moved = refiner.refine(_slice(sample), pts + shift)
        before.append(np.linalg.norm(shift, axis=1)[present] * mm)
        after.append(np.linalg.norm(moved - pts, axis=1)[present] * mm)
    return {
        "median_mm_displaced": float(np.median(np.concatenate(before))),
        "median_mm_refined": float(np.median(np.concatenate(after))),
    }


def refiner_card(training_data: str, recipe: RefinerRecipe, metrics: dict[str, Any]) -> ModelCard:
    return patch_model_card(
        REFINER_ARCH,
        training_data,
        intended_use="research; moves points found by a CCF-Net onto their lumbar structure",
        outputs="per structure: where it is in the patch, (u, v) in [-1, 1]",
        recipe=recipe.to_dict(),
        metrics=metrics,
    )


def load_refiner(path: Path) -> tuple[PointRefiner, ModelCard]:
    """A refiner checkpoint (weights digest verified), in eval mode on the CPU."""
    return load_patch_model(path, REFINER_ARCH, PointRefiner(), "point refiner")


def train_refiner_folds(
    samples: Sequence[SliceSample],
    folds: dict[str, int],
    out: Path,
    recipe: RefinerRecipe,
    training_data: str,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Train the refiner of every fold and the final one (`patch_training.train_folds`); returns the paths."""
    return train_folds(
        "refiner",
        samples,
        folds,
        out,
        train=lambda training, progress: train_refiner(training, recipe, progress),
        held_out_metrics=held_out_error,
        card=lambda data, metrics: refiner_card(data, recipe, metrics),
        training_data=training_data,
        log=log,
    )


REFINED_LIMITATION = "points are moved within their patch only: a point on a wrong level stays on that level"


def attach_refiner(network: Path, refiners: Sequence[Path], out: Path) -> ModelCard:
    """Write `<arch>-refined` (`-refined<n>` for n refiners, their points averaged): the network checkpoint whose
    decoded points each refiner moves, then (for a graded network) graded where they end."""
    if not refiners:
        raise ValueError("attaching needs at least one refiner")
    model, card = load_model(network)
    if isinstance(model, RefinedCCFNet):
        raise ValueError(f"{network} already has a refiner")
    loaded = [load_refiner(path) for path in refiners]
    recipe = dict(card.recipe)
    recipe["refiners"] = attached_sources(refiners, [refiner_card_ for _, refiner_card_ in loaded])
    refined = combined_card(
        card,
        refined_arch(card.arch, len(refiners)),
        card.outputs + "; points moved by a point refiner",
        REFINED_LIMITATION,
        recipe,
    )
    return save_model(out, RefinedCCFNet(model, [r for r, _ in loaded]), refined, half=True)


def attach_refiner_with_folds(network: Path, refiners: Sequence[Path], out: Path, folds: int) -> ModelCard:
    """`attach_refiner` for each of the `folds` fold models (all must exist), then for the final ones."""
    return attach_fold_by_fold("refiner", network, refiners, out, folds, attach_refiner)
