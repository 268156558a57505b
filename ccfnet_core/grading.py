"""Train the patch grader (`ccfnet_core.grader`) fold by fold, and attach it to a network checkpoint.

Each fold's grader learns from the true points of the studies outside that fold and is saved as
`<stem>.folds/fold<k>.pt` beside the final grader (all usable studies); a fold that exists is not trained again, so
a CPU run continues where an earlier session stopped. `attach_grader_with_folds` combines a network checkpoint and a
grader fold by fold into `<arch>-graded` checkpoints, so `ccfnet evaluate --folds` reads each held-out study with
the network and the grader that did not train on it: the grader's out-of-fold numbers are the graded model's.
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
import torch.nn.functional as F

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
from ccfnet_core.grader import PATCH_LEVELS, PATCH_PIXELS, PatchGrader, PatchJitter, crop_patches
from ccfnet_core.metrics import roc_auc
from ccfnet_core.model import CCFNet, GradedCCFNet, PairedCCFNet, graded_arch
from ccfnet_core.sample import SliceSample
from ccfnet_core.structures import DISC_INDICES, NUM_STRUCTURES, VERTEBRA_INDICES

GRADER_ARCH = "patch-grader"
GRADED_LIMITATION = "the grade is read in a patch at each found point: a point on a wrong level is graded as that level"
Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class GraderRecipe:
    """How a grader is trained (the defaults are the recipe measured in docs/model.md)."""

    epochs: int = 30
    batch_size: int = 128
    max_lr: float = 2e-3
    weight_decay: float = 1e-2
    seed: int = 0
    jitter: PatchJitter = field(default_factory=PatchJitter)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(patch_pixels=PATCH_PIXELS, patch_levels=PATCH_LEVELS, optimiser="AdamW, one-cycle lr")
        return data


def _training_patches(
    samples: Sequence[SliceSample], rng: np.random.Generator, jitter: PatchJitter | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Patches at every study's true points, with their structure indices and targets (NaN-target points dropped)."""
    patches, structures, targets = [], [], []
    for sample in samples:
        image = torch.from_numpy(np.ascontiguousarray(sample.image[1], dtype=np.float32))
        patches.append(crop_patches(image, sample.points, jitter, rng))
        structures.append(torch.arange(NUM_STRUCTURES))
        targets.append(torch.from_numpy(sample.abnormal_targets()).float())
    x, k, y = torch.cat(patches), torch.cat(structures), torch.cat(targets)
    keep = torch.isfinite(y)
    return x[keep], k[keep], y[keep]


def train_grader(samples: Sequence[SliceSample], recipe: GraderRecipe, progress: Progress | None = None) -> PatchGrader:
    """A grader trained on the true points of `samples` (fresh patches every epoch: the jitter is the augmentation)."""
    usable = [s for s in samples if np.isfinite(s.abnormal_targets()).any() and s.present.sum() >= 2]
    if not usable:
        raise ValueError("no study with a graded, annotated point to train the grader on")
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    grader = PatchGrader()
    optimiser = torch.optim.AdamW(grader.parameters(), lr=recipe.max_lr, weight_decay=recipe.weight_decay)
    points = sum(int(np.isfinite(s.abnormal_targets()).sum()) for s in usable)
    steps = recipe.epochs * math.ceil(points / recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, recipe.max_lr, total_steps=steps)
    for epoch in range(recipe.epochs):
        grader.train()
        x, k, y = _training_patches(usable, rng, recipe.jitter)
        order = torch.randperm(len(y))
        total = 0.0
        for start in range(0, len(y), recipe.batch_size):
            batch = order[start : start + recipe.batch_size]
            loss = F.binary_cross_entropy_with_logits(grader(x[batch], k[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if schedule.last_epoch < steps - 1:
                schedule.step()
            total += loss.item() * len(batch)
        if progress:
            progress(epoch + 1, recipe.epochs, total / len(y))
    return grader.eval()


def held_out_auc(grader: PatchGrader, samples: Sequence[SliceSample]) -> dict[str, float]:
    """The grader's ROC-AUC (percent) per type at the true points of `samples` (no localisation involved)."""
    logits, targets = [], []
    with torch.no_grad():
        for sample in samples:
            image = torch.from_numpy(np.ascontiguousarray(sample.image[1], dtype=np.float32))
            logits.append(grader.grade(image, sample.points).numpy())
            targets.append(sample.abnormal_targets())
    scores, truth = np.stack(logits), np.stack(targets)
    out = {}
    for name, columns in (("Disc", list(DISC_INDICES)), ("Vertebra", list(VERTEBRA_INDICES))):
        t, s = truth[:, columns].ravel(), scores[:, columns].ravel()
        known = np.isfinite(t)
        out[f"AUC-{name}-true-points"] = 100 * roc_auc(t[known], s[known])
    return out


def grader_card(training_data: str, recipe: GraderRecipe, metrics: dict[str, Any]) -> ModelCard:
    return new_card(
        arch=GRADER_ARCH,
        input_size=PATCH_PIXELS,
        stride=1,
        sigma=0.0,
        training_data=training_data,
        intended_use="research; the grade of lumbar structures at points found by a CCF-Net",
        phantom_only=False,
        preprocessing=(
            "the middle input slice in [0, 1]; per point a patch of PATCH_LEVELS lumbar levels (a level = twice "
            "the median step between the points along the spine), rotated to the local spine axis, 64 x 64"
        ),
        outputs="per structure: P(abnormal) logit, vertebra v2 vs v1; disc v2/v3/v4 vs v1",
        recipe=recipe.to_dict(),
        metrics=metrics,
    )


def load_grader(path: Path) -> tuple[PatchGrader, ModelCard]:
    """A grader checkpoint (weights digest verified), in eval mode on the CPU."""
    card, state = read_checkpoint(path)
    if card.arch != GRADER_ARCH:
        raise CheckpointError(f"{path}: a {card.arch} checkpoint, not a patch grader")
    grader = PatchGrader()
    grader.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return grader.eval(), card


def train_grader_folds(
    samples: Sequence[SliceSample],
    folds: dict[str, int],
    out: Path,
    recipe: GraderRecipe,
    training_data: str,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Train the grader of every fold (held out: that fold) and the final one (every study); skip those that exist.

    `samples` are the usable studies (flagged ones already left out). Returns the paths, folds first.
    """
    k = max(folds.values()) + 1
    written = []
    for fold in [*range(k), -1]:
        path = fold_checkpoint(out, fold) if fold >= 0 else out
        written.append(path)
        if path.is_file():
            log(f"grader {path}: exists, kept")
            continue
        train = [s for s in samples if fold < 0 or folds[s.study_id] != fold]
        held_out = [s for s in samples if fold >= 0 and folds[s.study_id] == fold]
        name = f"fold {fold}" if fold >= 0 else "final"
        started = time.perf_counter()

        def progress(epoch: int, epochs: int, loss: float, name: str = name, started: float = started) -> None:
            log(f"grader {name}: epoch {epoch}/{epochs} loss {loss:.4f} ({time.perf_counter() - started:.0f} s)")

        grader = train_grader(train, recipe, progress)
        metrics: dict[str, Any] = {"train_studies": len(train), "seconds": round(time.perf_counter() - started, 1)}
        if held_out:
            metrics.update(held_out_auc(grader, held_out), held_out_studies=len(held_out))
        data = f"{training_data}; {len(train)} studies" + (f", fold {fold} held out" if fold >= 0 else "")
        save_model(path, grader, grader_card(data, recipe, metrics), half=True)
        log(f"grader {name}: saved {path} {metrics}")
    return written


Graders = Path | Sequence[Path]


def _grader_paths(grader: Graders) -> list[Path]:
    paths = [grader] if isinstance(grader, Path) else list(grader)
    if not paths:
        raise ValueError("attaching needs at least one grader")
    return paths


def attach_grader(network: Path, grader: Graders, out: Path, network_share: float = 0.0) -> ModelCard:
    """Write `<arch>-graded` (`-graded<n>` for n graders, their logits averaged): the network checkpoint with the
    grader(s), P(abnormal) from both at the share given."""
    model, card = load_model(network)
    if not isinstance(model, CCFNet | PairedCCFNet):
        raise ValueError(f"{network} already has a grader")
    paths = _grader_paths(grader)
    loaded = [load_grader(path) for path in paths]
    sources = [
        {**source_record(grader_card_, path), "training_data": grader_card_.training_data}
        for path, (_, grader_card_) in zip(paths, loaded, strict=True)
    ]
    recipe = dict(card.recipe)
    recipe.update({"grader": sources[0]} if len(sources) == 1 else {"graders": sources})
    recipe["network_logit_share"] = network_share
    graded = replace(
        new_card(**{k: v for k, v in asdict(card).items() if k not in ("model_uuid", "created", "version")}),
        arch=graded_arch(card.arch, len(paths)),
        outputs=card.outputs + "; P(abnormal) re-read by a patch grader at each point",
        limitations=tuple(dict.fromkeys((*card.limitations, GRADED_LIMITATION))),
        recipe=recipe,
        metrics={},
    )
    model_out = GradedCCFNet(model, [g for g, _ in loaded], network_share)
    return save_model(out, model_out, graded, half=True)


def attach_grader_with_folds(
    network: Path, grader: Graders, out: Path, folds: int, network_share: float = 0.0
) -> ModelCard:
    """`attach_grader` for each of the `folds` fold models (all must exist), then for the final ones."""
    paths = _grader_paths(grader)
    members = [
        (fold_checkpoint(network, k), [fold_checkpoint(p, k) for p in paths], fold_checkpoint(out, k))
        for k in range(folds)
    ]
    for source in (path for net, grd, _ in members for path in (net, *grd)):
        if not source.is_file():
            raise FileNotFoundError(f"attaching the grader fold by fold needs {source}")
    for net, grd, result in members:
        attach_grader(net, grd, result, network_share)
    return attach_grader(network, paths, out, network_share)
