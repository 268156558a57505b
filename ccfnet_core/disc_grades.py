"""The disc grade beyond normal / abnormal: a patch grader with one logit per challenge disc class (issue 26).

Why: the shipped model has one abnormality logit per disc, so every abnormal disc was called a bulge, and in the
155 labelled studies half of them are protrusions or worse. The grade grader is the patch grader's network
(`ccfnet_core.grader.PatchGrader`) with five outputs, normal, bulge, protrusion, extrusion and Schmorl's node
(v1..v5), trained on the discs' true points fold by fold exactly as the binary graders are
(`patch_training.train_folds`), so its out-of-fold outputs are honest. It does not replace the binary path:
P(abnormal) still comes from the binary graders and the networks (the paper's Score); the grade grader says which
abnormal grade, and whether a Schmorl's node is seen (`ccfnet_core.readout` turns both into the label).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
import torch.nn.functional as F

from ccfnet_core.checkpoint import ModelCard, load_model, save_model
from ccfnet_core.grader import PATCH_LEVELS, PATCH_PIXELS, PatchGrader, PatchJitter, crop_patches
from ccfnet_core.model import GradedCCFNet, RefinedCCFNet, with_grades_arch
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
from ccfnet_core.structures import DISC_INDICES, DISC_LABELS

GRADE_GRADER_ARCH = "disc-grade-grader"
DISC_GRADES: Final[tuple[str, ...]] = tuple(DISC_LABELS)  # v1..v5, the grade grader's output order
# Where a disc carries two labels ({v2, v5}), the class it is trained as: the herniation grade before the node.
_PRECEDENCE: Final[tuple[str, ...]] = ("v4", "v3", "v2", "v1", "v5")


def disc_grade_target(labels: frozenset[str]) -> int:
    """The grade class (index into DISC_GRADES) of a disc's label set; -1 when it has none."""
    for label in _PRECEDENCE:
        if label in labels:
            return DISC_GRADES.index(label)
    return -1


def disc_grade_targets(sample: SliceSample) -> np.ndarray:
    """(6,) grade class per disc of `sample` (DISC_INDICES order); -1 where the disc is missing or unlabelled."""
    present = sample.present
    return np.array([disc_grade_target(sample.labels[k]) if present[k] else -1 for k in DISC_INDICES])


@dataclass(frozen=True)
class GradeRecipe:
    """How a grade grader is trained: the binary grader's recipe, cross-entropy with class weights
    (n_largest / n_class) ** class_weight_power, so the rare grades (34 extrusions) are not ignored."""

    epochs: int = 30
    batch_size: int = 128
    max_lr: float = 2e-3
    weight_decay: float = 1e-2
    seed: int = 0
    class_weight_power: float = 0.5
    jitter: PatchJitter = field(default_factory=PatchJitter)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(patch_pixels=PATCH_PIXELS, patch_levels=PATCH_LEVELS, optimiser="AdamW, one-cycle lr",
                    classes=list(DISC_GRADES), loss="weighted cross-entropy over the disc classes")
        return data


def class_weights(counts: np.ndarray, power: float) -> torch.Tensor:
    """(classes,) loss weights (largest count / count) ** power; a class with no example gets weight 0."""
    counts = np.asarray(counts, dtype=np.float64)
    weights = np.where(counts > 0, (counts.max() / np.maximum(counts, 1.0)) ** power, 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def _slice(sample: SliceSample) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(sample.image[1], dtype=np.float32))


def train_grade_grader(
    samples: Sequence[SliceSample], recipe: GradeRecipe, progress: Progress | None = None
) -> PatchGrader:
    """A grade grader trained on the true disc points of `samples` (fresh jittered patches every epoch)."""
    usable = [s for s in samples if (disc_grade_targets(s) >= 0).any() and s.present.sum() >= 2]
    if not usable:
        raise ValueError("no study with a labelled disc to train the grade grader on")
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    images = [_slice(s) for s in usable]
    targets = [torch.from_numpy(disc_grade_targets(s)) for s in usable]
    counts = np.bincount(torch.cat(targets)[torch.cat(targets) >= 0].numpy(), minlength=len(DISC_GRADES))
    weights = class_weights(counts, recipe.class_weight_power)
    discs = torch.tensor(DISC_INDICES)

    def epoch_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xs, ks, ys = [], [], []
        for image, sample, target in zip(images, usable, targets, strict=True):
            patches = crop_patches(image, sample.points, recipe.jitter, rng)[discs]
            keep = target >= 0
            xs.append(patches[keep])
            ks.append(discs[keep])
            ys.append(target[keep])
        return torch.cat(xs), torch.cat(ks), torch.cat(ys)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, weight=weights)

    return fit_patch_model(
        PatchGrader(classes=len(DISC_GRADES)), epoch_data, loss, int(counts.sum()), recipe, progress
    )


def grade_probabilities(grader: PatchGrader, image: torch.Tensor, points: np.ndarray) -> np.ndarray:
    """(6, 5) softmax over DISC_GRADES for the discs of one (H, W) slice at `points` (flip-averaged logits)."""
    with torch.no_grad():
        logits = grader.grade(image, points, only=DISC_INDICES)
    return torch.softmax(logits.double(), dim=1).cpu().numpy()


def held_out_grade_metrics(grader: PatchGrader, samples: Sequence[SliceSample]) -> dict[str, Any]:
    """Accuracy, per-class recall and macro-F1 (percent) of the grade at the true disc points of `samples`."""
    truth, predicted = [], []
    for sample in samples:
        target = disc_grade_targets(sample)
        if not (target >= 0).any():
            continue
        probabilities = grade_probabilities(grader, _slice(sample), sample.points)
        truth.append(target[target >= 0])
        predicted.append(probabilities.argmax(axis=1)[target >= 0])
    y, p = np.concatenate(truth), np.concatenate(predicted)
    recall, f1 = {}, []
    for index, label in enumerate(DISC_GRADES):
        tp = int(((p == index) & (y == index)).sum())
        support, called = int((y == index).sum()), int((p == index).sum())
        recall[label] = 100.0 * tp / support if support else float("nan")
        if support + called:
            f1.append(200.0 * tp / (support + called))
    return {
        "grade_accuracy_true_points": 100.0 * float((p == y).mean()),
        "grade_recall_true_points": recall,
        "grade_macro_f1_true_points": float(np.mean(f1)),
    }


def grade_grader_card(training_data: str, recipe: GradeRecipe, metrics: dict[str, Any]) -> ModelCard:
    return patch_model_card(
        GRADE_GRADER_ARCH,
        training_data,
        intended_use="research; the grade of lumbar discs at points found by a CCF-Net",
        outputs="per disc: logits of normal, bulge, protrusion, extrusion, Schmorl's node (challenge v1..v5)",
        recipe=recipe.to_dict(),
        metrics=metrics,
    )


def new_grade_grader() -> PatchGrader:
    return PatchGrader(classes=len(DISC_GRADES))


def load_grade_grader(path: Path) -> tuple[PatchGrader, ModelCard]:
    """A grade grader checkpoint (weights digest verified), in eval mode on the CPU."""
    return load_patch_model(path, GRADE_GRADER_ARCH, new_grade_grader(), "disc grade grader")


def train_grade_grader_folds(
    samples: Sequence[SliceSample],
    folds: dict[str, int],
    out: Path,
    recipe: GradeRecipe,
    training_data: str,
    log: Callable[[str], None] = print,
    only: Sequence[int] | None = None,
) -> list[Path]:
    """Train the grade grader of every fold and the final one (`patch_training.train_folds`; `only` those folds,
    -1 the final one); returns the paths."""
    return train_folds(
        "grade grader",
        samples,
        folds,
        out,
        train=lambda training, progress: train_grade_grader(training, recipe, progress),
        held_out_metrics=held_out_grade_metrics,
        card=lambda data, metrics: grade_grader_card(data, recipe, metrics),
        training_data=training_data,
        log=log,
        only=only,
    )


GRADES_LIMITATION = (
    "the disc grade (bulge / protrusion / extrusion) is read from one mid-sagittal slice at the found point; where its "
    "share is low the disc is called 'abnormal' without a grade"
)


def attach_grade_grader(model: Path, grade_grader: Path, out: Path, int8: bool = False) -> ModelCard:
    """Write `model` (graded, refined or not) with `grade_grader` beside its binary graders (`<...>-graded<n>-grades`):
    P(abnormal) and the points unchanged, the disc grade added. `int8` as `checkpoint.save_model`."""
    network, card = load_model(model)
    graded: object = network.network if isinstance(network, RefinedCCFNet) else network
    if not isinstance(graded, GradedCCFNet):
        raise ValueError(f"{model} has no patch grader to put a grade grader beside")
    if graded.grade_grader is not None:
        raise ValueError(f"{model} already has a disc grade grader")
    grader, grader_card = load_grade_grader(grade_grader)
    graded.grade_grader = grader
    recipe = dict(card.recipe)
    recipe["grade_grader"] = attached_sources([grade_grader], [grader_card])[0]
    combined = combined_card(
        card,
        with_grades_arch(card.arch),
        card.outputs + "; per disc a softmax over v1..v5 from a disc grade grader at each point",
        GRADES_LIMITATION,
        recipe,
    )
    return save_model(out, network, combined, half=True, int8=int8)


def attach_grade_grader_with_folds(
    model: Path, grade_grader: Path, out: Path, folds: int, int8: bool = False
) -> ModelCard:
    """`attach_grade_grader` for each of the `folds` fold models (all must exist), then for the final ones."""
    return attach_fold_by_fold(
        "grade grader",
        model,
        [grade_grader],
        out,
        folds,
        lambda net, parts, result: attach_grade_grader(net, parts[0], result, int8),
    )
