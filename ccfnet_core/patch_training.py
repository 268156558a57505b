"""What training and attaching a patch model (the grader, the point refiner) involves besides the model itself.

Both learn from patches cut afresh every epoch at the true points of the training studies (their jitter is the
augmentation), with AdamW on a one-cycle schedule; both are trained fold by fold (`<stem>.folds/fold<k>.pt` beside
the final model on every usable study, one that exists is kept so a stopped CPU run continues) and combined with a
network checkpoint fold by fold, so `ccfnet evaluate --folds` reads each held-out study with models that did not
train on it. `ccfnet_core.grading` and `ccfnet_core.refining` say what is particular to each.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from ccfnet_core.checkpoint import (
    CheckpointError,
    ModelCard,
    float32_state,
    new_card,
    read_checkpoint,
    save_model,
    source_record,
)
from ccfnet_core.evaluate import fold_checkpoint
from ccfnet_core.grader import PATCH_PIXELS
from ccfnet_core.sample import SliceSample

Progress = Callable[[int, int, float], None]
# One epoch's training set: patches, their structure indices, their targets.
EpochData = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
PATCH_PREPROCESSING = (
    "the middle input slice in [0, 1]; per point a patch of PATCH_LEVELS lumbar levels (a level = twice "
    "the median step between the points along the spine), rotated to the local spine axis, 64 x 64"
)
Model = TypeVar("Model", bound=nn.Module)


class LoopRecipe(Protocol):
    """The optimiser settings a patch model's recipe holds."""

    @property
    def epochs(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def max_lr(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...


def fit_patch_model(
    model: Model,
    epoch_data: Callable[[], EpochData],
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    points_per_epoch: int,
    recipe: LoopRecipe,
    progress: Progress | None = None,
) -> Model:
    """Train `model(patches, structures)` against `loss_of(output, targets)` on fresh `epoch_data()` every epoch."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=recipe.max_lr, weight_decay=recipe.weight_decay)
    steps = recipe.epochs * math.ceil(points_per_epoch / recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, recipe.max_lr, total_steps=steps)
    for epoch in range(recipe.epochs):
        model.train()
        x, k, y = epoch_data()
        order = torch.randperm(len(y))
        total = 0.0
        for start in range(0, len(y), recipe.batch_size):
            batch = order[start : start + recipe.batch_size]
            loss = loss_of(model(x[batch], k[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if schedule.last_epoch < steps - 1:
                schedule.step()
            total += loss.item() * len(batch)
        if progress:
            progress(epoch + 1, recipe.epochs, total / len(y))
    return model.eval()


def patch_model_card(
    arch: str, training_data: str, intended_use: str, outputs: str, recipe: dict[str, Any], metrics: dict[str, Any]
) -> ModelCard:
    return new_card(
        arch=arch,
        input_size=PATCH_PIXELS,
        stride=1,
        sigma=0.0,
        training_data=training_data,
        intended_use=intended_use,
        phantom_only=False,
        preprocessing=PATCH_PREPROCESSING,
        outputs=outputs,
        recipe=recipe,
        metrics=metrics,
    )


def load_patch_model(path: Path, arch: str, model: Model, what: str) -> tuple[Model, ModelCard]:
    """The `arch` checkpoint at `path` loaded into `model` (weights digest verified), in eval mode on the CPU."""
    card, state = read_checkpoint(path)
    if card.arch != arch:
        raise CheckpointError(f"{path}: a {card.arch} checkpoint, not a {what}")
    model.load_state_dict(float32_state(state))
    return model.eval(), card


def train_folds(
    what: str,
    samples: Sequence[SliceSample],
    folds: dict[str, int],
    out: Path,
    train: Callable[[Sequence[SliceSample], Progress], Model],
    held_out_metrics: Callable[[Model, Sequence[SliceSample]], dict[str, float]],
    card: Callable[[str, dict[str, Any]], ModelCard],
    training_data: str,
    log: Callable[[str], None] = print,
    only: Sequence[int] | None = None,
) -> list[Path]:
    """Train the `what` of every fold (held out: that fold) and the final one (every study); skip those that exist.

    `samples` are the usable studies (flagged ones already left out). `only` trains those folds alone (-1: the
    final one), so two processes can share the work. Returns the paths, folds first.
    """
    k = max(folds.values()) + 1
    written = []
    for fold in [*range(k), -1]:
        path = fold_checkpoint(out, fold) if fold >= 0 else out
        written.append(path)
        if path.is_file():
            log(f"{what} {path}: exists, kept")
            continue
        if only is not None and fold not in only:
            continue
        training = [s for s in samples if fold < 0 or folds[s.study_id] != fold]
        held_out = [s for s in samples if fold >= 0 and folds[s.study_id] == fold]
        name = f"fold {fold}" if fold >= 0 else "final"
        started = time.perf_counter()

        def progress(epoch: int, epochs: int, loss: float, name: str = name, started: float = started) -> None:
            log(f"{what} {name}: epoch {epoch}/{epochs} loss {loss:.4f} ({time.perf_counter() - started:.0f} s)")

        model = train(training, progress)
        metrics: dict[str, Any] = {"train_studies": len(training), "seconds": round(time.perf_counter() - started, 1)}
        if held_out:
            metrics.update(held_out_metrics(model, held_out), held_out_studies=len(held_out))
        data = f"{training_data}; {len(training)} studies" + (f", fold {fold} held out" if fold >= 0 else "")
        save_model(path, model, card(data, metrics), half=True)
        log(f"{what} {name}: saved {path} {metrics}")
    return written


def attached_sources(paths: Sequence[Path], cards: Sequence[ModelCard]) -> list[dict[str, Any]]:
    """What a combined checkpoint's card records of each patch model it holds."""
    return [
        {**source_record(card, path), "training_data": card.training_data}
        for path, card in zip(paths, cards, strict=True)
    ]


def combined_card(card: ModelCard, arch: str, outputs: str, limitation: str, recipe: dict[str, Any]) -> ModelCard:
    """A new card for `card`'s network with patch models attached: its own identity, no metrics and no readout
    until scored and fitted."""
    return replace(
        new_card(**{k: v for k, v in asdict(card).items() if k not in ("model_uuid", "created", "version")}),
        arch=arch,
        outputs=outputs,
        limitations=tuple(dict.fromkeys((*card.limitations, limitation))),
        recipe=recipe,
        metrics={},
        readout={},
    )


def attach_fold_by_fold(
    what: str,
    network: Path,
    parts: Sequence[Path],
    out: Path,
    folds: int,
    attach: Callable[[Path, list[Path], Path], ModelCard],
) -> ModelCard:
    """`attach` for each of the `folds` fold models (all must exist), then for the final ones."""
    members = [
        (fold_checkpoint(network, k), [fold_checkpoint(p, k) for p in parts], fold_checkpoint(out, k))
        for k in range(folds)
    ]
    for source in (path for net, fold_parts, _ in members for path in (net, *fold_parts)):
        if not source.is_file():
            raise FileNotFoundError(f"attaching the {what} fold by fold needs {source}")
    for net, fold_parts, result in members:
        attach(net, fold_parts, result)
    return attach(network, list(parts), out)
