"""Train the point refiner (`ccfnet_core.refiner`) fold by fold, and attach it to a network checkpoint.

As for the patch grader (`ccfnet_core.grading`): each fold's refiner learns from the true points of the studies
outside that fold and is saved as `<stem>.folds/fold<k>.pt` beside the final refiner (all usable studies); one that
exists is not trained again. `attach_refiner_with_folds` combines a network checkpoint (single, pair, graded) and
the refiner fold by fold into `<arch>-refined` checkpoints, so `ccfnet evaluate --folds` scores them out of fold.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ccfnet_core.checkpoint import (
    CheckpointError,
    ModelCard,
    load_model,
    new_card,
    read_checkpoint,
    save_model,
    source_record,
)
from ccfnet_core.evaluate import fold_checkpoint
from ccfnet_core.grader import PATCH_LEVELS, PATCH_PIXELS, level_pixels
from ccfnet_core.model import RefinedCCFNet, refined_arch
from ccfnet_core.refiner import MM_PER_LEVEL, PointRefiner, RefinerJitter, training_patches
from ccfnet_core.sample import SliceSample
from ccfnet_core.structures import NUM_STRUCTURES

REFINER_ARCH = "point-refiner"
Progress = Callable[[int, int, float], None]


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
    optimiser = torch.optim.AdamW(refiner.parameters(), lr=recipe.max_lr, weight_decay=recipe.weight_decay)
    images = [_slice(s) for s in usable]
    points = sum(int(s.present.sum()) for s in usable)
    steps = recipe.epochs * math.ceil(points / recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, recipe.max_lr, total_steps=steps)
    for epoch in range(recipe.epochs):
        refiner.train()
        xs, ys, ks = [], [], []
        for image, sample in zip(images, usable, strict=True):
            patches, target, present = training_patches(image, sample.points, recipe.jitter, rng)
            keep = torch.from_numpy(present)
            xs.append(patches[keep])
            ys.append(target[keep])
            ks.append(torch.arange(NUM_STRUCTURES)[keep])
        x, y, k = torch.cat(xs), torch.cat(ys), torch.cat(ks)
        order = torch.randperm(len(y))
        total = 0.0
        for start in range(0, len(y), recipe.batch_size):
            batch = order[start : start + recipe.batch_size]
            loss = (refiner(x[batch], k[batch]) - y[batch]).abs().sum(dim=1).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if schedule.last_epoch < steps - 1:
                schedule.step()
            total += loss.item() * len(batch)
        if progress:
            progress(epoch + 1, recipe.epochs, total / len(y))
    return refiner.eval()


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
    return new_card(
        arch=REFINER_ARCH,
        input_size=PATCH_PIXELS,
        stride=1,
        sigma=0.0,
        training_data=training_data,
        intended_use="research; moves points found by a CCF-Net onto their lumbar structure",
        phantom_only=False,
        preprocessing=(
            "the middle input slice in [0, 1]; per point a patch of PATCH_LEVELS lumbar levels (a level = twice "
            "the median step between the points along the spine), rotated to the local spine axis, 64 x 64"
        ),
        outputs="per structure: where it is in the patch, (u, v) in [-1, 1]",
        recipe=recipe.to_dict(),
        metrics=metrics,
    )


def load_refiner(path: Path) -> tuple[PointRefiner, ModelCard]:
    """A refiner checkpoint (weights digest verified), in eval mode on the CPU."""
    card, state = read_checkpoint(path)
    if card.arch != REFINER_ARCH:
        raise CheckpointError(f"{path}: a {card.arch} checkpoint, not a point refiner")
    refiner = PointRefiner()
    refiner.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return refiner.eval(), card


def train_refiner_folds(
    samples: Sequence[SliceSample],
    folds: dict[str, int],
    out: Path,
    recipe: RefinerRecipe,
    training_data: str,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Train the refiner of every fold (held out: that fold) and the final one (every study); skip those that exist.

    `samples` are the usable studies (flagged ones already left out). Returns the paths, folds first.
    """
    k = max(folds.values()) + 1
    written = []
    for fold in [*range(k), -1]:
        path = fold_checkpoint(out, fold) if fold >= 0 else out
        written.append(path)
        if path.is_file():
            log(f"refiner {path}: exists, kept")
            continue
        train = [s for s in samples if fold < 0 or folds[s.study_id] != fold]
        held_out = [s for s in samples if fold >= 0 and folds[s.study_id] == fold]
        name = f"fold {fold}" if fold >= 0 else "final"
        started = time.perf_counter()

        def progress(epoch: int, epochs: int, loss: float, name: str = name, started: float = started) -> None:
            log(f"refiner {name}: epoch {epoch}/{epochs} loss {loss:.4f} ({time.perf_counter() - started:.0f} s)")

        refiner = train_refiner(train, recipe, progress)
        metrics: dict[str, Any] = {"train_studies": len(train), "seconds": round(time.perf_counter() - started, 1)}
        if held_out:
            metrics.update(held_out_error(refiner, held_out), held_out_studies=len(held_out))
        data = f"{training_data}; {len(train)} studies" + (f", fold {fold} held out" if fold >= 0 else "")
        save_model(path, refiner, refiner_card(data, recipe, metrics), half=True)
        log(f"refiner {name}: saved {path} {metrics}")
    return written


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
    sources = [
        {**source_record(refiner_card_, path), "training_data": refiner_card_.training_data}
        for path, (_, refiner_card_) in zip(refiners, loaded, strict=True)
    ]
    recipe = dict(card.recipe)
    recipe["refiners"] = sources
    refined = replace(
        new_card(**{k: v for k, v in asdict(card).items() if k not in ("model_uuid", "created", "version")}),
        arch=refined_arch(card.arch, len(refiners)),
        outputs=card.outputs + "; points moved by a point refiner",
        limitations=tuple(dict.fromkeys((*card.limitations, REFINED_LIMITATION))),
        recipe=recipe,
        metrics={},
    )
    return save_model(out, RefinedCCFNet(model, [r for r, _ in loaded]), refined, half=True)


def attach_refiner_with_folds(network: Path, refiners: Sequence[Path], out: Path, folds: int) -> ModelCard:
    """`attach_refiner` for each of the `folds` fold models (all must exist), then for the final ones."""
    members = [
        (fold_checkpoint(network, k), [fold_checkpoint(p, k) for p in refiners], fold_checkpoint(out, k))
        for k in range(folds)
    ]
    for source in (path for net, refs, _ in members for path in (net, *refs)):
        if not source.is_file():
            raise FileNotFoundError(f"attaching the refiner fold by fold needs {source}")
    for net, refs, result in members:
        attach_refiner(net, refs, result)
    return attach_refiner(network, refiners, out)
