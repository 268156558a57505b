"""Train the patch grader (`ccfnet_core.grader`) fold by fold, and attach it to a network checkpoint.

Each fold's grader learns from the true points of the studies outside that fold and is saved as
`<stem>.folds/fold<k>.pt` beside the final grader (all usable studies); a fold that exists is not trained again, so
a CPU run continues where an earlier session stopped. `attach_grader_with_folds` combines a network checkpoint and a
grader fold by fold into `<arch>-graded` checkpoints, so `ccfnet evaluate --folds` reads each held-out study with
the network and the grader that did not train on it: the grader's out-of-fold numbers are the graded model's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ccfnet_core.checkpoint import ModelCard, load_model, save_model
from ccfnet_core.grader import PATCH_LEVELS, PATCH_PIXELS, PatchGrader, PatchJitter, crop_patches
from ccfnet_core.metrics import roc_auc
from ccfnet_core.model import CCFNet, GradedCCFNet, PairedCCFNet, graded_arch
from ccfnet_core.patch_training import (
    Progress,
    attach_fold_by_fold,
    attached_sources,
    combined_card,
    fit_patch_model,
    load_patch_model,
    patch_model_card,
    train_folds,
)
from ccfnet_core.sample import SliceSample
from ccfnet_core.structures import DISC_INDICES, NUM_STRUCTURES, VERTEBRA_INDICES

GRADER_ARCH = "patch-grader"
GRADED_LIMITATION = "the grade is read in a patch at each found point: a point on a wrong level is graded as that level"


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
    points = sum(int(np.isfinite(s.abnormal_targets()).sum()) for s in usable)
    return fit_patch_model(
        PatchGrader(),
        lambda: _training_patches(usable, rng, recipe.jitter),
        F.binary_cross_entropy_with_logits,
        points,
        recipe,
        progress,
    )


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
    return patch_model_card(
        GRADER_ARCH,
        training_data,
        intended_use="research; the grade of lumbar structures at points found by a CCF-Net",
        outputs="per structure: P(abnormal) logit, vertebra v2 vs v1; disc v2/v3/v4 vs v1",
        recipe=recipe.to_dict(),
        metrics=metrics,
    )


def load_grader(path: Path) -> tuple[PatchGrader, ModelCard]:
    """A grader checkpoint (weights digest verified), in eval mode on the CPU."""
    return load_patch_model(path, GRADER_ARCH, PatchGrader(), "patch grader")


def train_grader_folds(
    samples: Sequence[SliceSample],
    folds: dict[str, int],
    out: Path,
    recipe: GraderRecipe,
    training_data: str,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Train the grader of every fold and the final one (`patch_training.train_folds`); returns the paths."""
    return train_folds(
        "grader",
        samples,
        folds,
        out,
        train=lambda training, progress: train_grader(training, recipe, progress),
        held_out_metrics=held_out_auc,
        card=lambda data, metrics: grader_card(data, recipe, metrics),
        training_data=training_data,
        log=log,
    )


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
    sources = attached_sources(paths, [grader_card_ for _, grader_card_ in loaded])
    recipe = dict(card.recipe)
    recipe.update({"grader": sources[0]} if len(sources) == 1 else {"graders": sources})
    recipe["network_logit_share"] = network_share
    graded = combined_card(
        card,
        graded_arch(card.arch, len(paths)),
        card.outputs + "; P(abnormal) re-read by a patch grader at each point",
        GRADED_LIMITATION,
        recipe,
    )
    model_out = GradedCCFNet(model, [g for g, _ in loaded], network_share)
    return save_model(out, model_out, graded, half=True)


def attach_grader_with_folds(
    network: Path, grader: Graders, out: Path, folds: int, network_share: float = 0.0
) -> ModelCard:
    """`attach_grader` for each of the `folds` fold models (all must exist), then for the final ones."""
    return attach_fold_by_fold(
        "grader",
        network,
        _grader_paths(grader),
        out,
        folds,
        lambda net, graders, result: attach_grader(net, graders, result, network_share),
    )
