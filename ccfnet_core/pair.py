"""Assemble a localiser and a classifier checkpoint into one pair checkpoint (`<arch>-pair`).

Trained from scratch, one CCF-Net trades localisation for classification through the weight of its BCE terms
(docs/model.md): a low weight counts the levels best, a high one grades them best. A pair runs one network of each
and reads the classifier's logits at the localiser's points (`ccfnet_core.model.PairedCCFNet`); with
`logits="mean"` it reads the mean of both networks' logits there, a two-member ensemble for the grade. Its card names
both sources by version and weights digest. Fold models beside both sources (`<stem>.folds/fold<k>.pt`) are paired
fold by fold, so `ccfnet evaluate --folds` scores the pair out of fold exactly as it scores one network.
`fit_pair_context` then fits the pair's study context (`ccfnet_core.context`) on out-of-fold logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ccfnet_core.checkpoint import ModelCard, load_model, new_card, save_model
from ccfnet_core.context import CONTEXT_FEATURES, CONTEXT_L2, CONTEXT_TYPES, fit_context, identity_weights
from ccfnet_core.evaluate import fold_checkpoint
from ccfnet_core.inference import point_logits
from ccfnet_core.model import PAIR_LOGITS, PAIR_SUFFIX, CCFNet, PairedCCFNet
from ccfnet_core.sample import SliceSample
from ccfnet_core.structures import NUM_STRUCTURES


def _source(card: ModelCard, path: Path) -> dict[str, object]:
    return {
        "file": path.name,
        "model_uuid": card.model_uuid,
        "weights_sha256": card.weights_sha256,
        "recipe": card.recipe,
        "metrics": {k: v for k, v in card.metrics.items() if k != "per_fold"},
    }


_LOGITS_TEXT = {
    "classifier": "P(abnormal) from the classifier's logits there",
    "mean": "P(abnormal) from the mean of both networks' logits there",
}


def check_logits(logits: str) -> float:
    """The localiser's logit share of a `logits` mode (`PAIR_LOGITS`); ValueError naming the modes."""
    if logits not in PAIR_LOGITS:
        raise ValueError(f"pair logits must be one of {', '.join(PAIR_LOGITS)}, not {logits!r}")
    return PAIR_LOGITS[logits]


def pair_card(
    localiser: ModelCard, classifier: ModelCard, loc_path: Path, cls_path: Path, logits: str = "classifier"
) -> ModelCard:
    """The pair's card: the localiser's preprocessing and data, both sources in the recipe, no metrics yet."""
    check_logits(logits)
    if localiser.arch.endswith(PAIR_SUFFIX) or classifier.arch.endswith(PAIR_SUFFIX):
        raise ValueError("a pair is made of two single networks, not of pairs")
    for name in ("arch", "input_size", "stride", "preprocessing", "structures"):
        if getattr(localiser, name) != getattr(classifier, name):
            raise ValueError(
                f"localiser and classifier differ in {name}: {getattr(localiser, name)} vs {getattr(classifier, name)}"
            )
    if localiser.phantom_only != classifier.phantom_only:
        raise ValueError("one source is phantom-only and the other is not")
    return new_card(
        arch=localiser.arch + PAIR_SUFFIX,
        input_size=localiser.input_size,
        stride=localiser.stride,
        sigma=localiser.sigma,
        training_data=localiser.training_data,
        intended_use=localiser.intended_use,
        phantom_only=localiser.phantom_only,
        recipe={
            "pair": f"points (heatmaps, offsets) from the localiser, {_LOGITS_TEXT[logits]}",
            "logits": logits,
            "localiser": _source(localiser, loc_path),
            "classifier": _source(classifier, cls_path),
        },
        limitations=tuple(dict.fromkeys((*localiser.limitations, *classifier.limitations))),
    )


def assemble_pair(
    localiser: Path, classifier: Path, out: Path, half: bool = True, logits: str = "classifier"
) -> ModelCard:
    """Write the pair of two single-network checkpoints to `out`; returns its card."""
    share = check_logits(logits)
    loc_model, loc_card = load_model(localiser)
    cls_model, cls_card = load_model(classifier)
    card = pair_card(loc_card, cls_card, localiser, classifier, logits)
    if not isinstance(loc_model, CCFNet) or not isinstance(cls_model, CCFNet):
        raise ValueError("a pair is made of two single networks, not of pairs")
    return save_model(out, PairedCCFNet(loc_model, cls_model, share), card, half=half)


def pair_members(localiser: Path, classifier: Path, out: Path, folds: int) -> list[tuple[Path, Path, Path]]:
    """(localiser, classifier, pair) paths of each fold model (`<stem>.folds/fold<k>.pt`), then of the final one."""
    fold = fold_checkpoint
    members = [(fold(localiser, k), fold(classifier, k), fold(out, k)) for k in range(folds)]
    return [*members, (localiser, classifier, out)]


def assemble_pair_with_folds(
    localiser: Path, classifier: Path, out: Path, folds: int, logits: str = "classifier"
) -> ModelCard:
    """The pair of the final models and of each of the `folds` fold models (all must exist)."""
    check_logits(logits)
    members = pair_members(localiser, classifier, out, folds)
    for source in (path for loc, cls, _ in members[:-1] for path in (loc, cls)):
        if not source.is_file():
            raise FileNotFoundError(f"pairing the fold models needs {source}")
    for loc, cls, pair in members:
        card = assemble_pair(loc, cls, pair, logits=logits)
    return card


def _load_pair(path: Path) -> tuple[PairedCCFNet, ModelCard]:
    model, card = load_model(path)
    if not isinstance(model, PairedCCFNet):
        raise ValueError(f"{path} is not a pair checkpoint; study context is fitted on pairs")
    return model, card


def _write_context(path: Path, weights: torch.Tensor, fitted_on: str, l2: float) -> ModelCard:
    """Rewrite the pair at `path` (half precision) with these context weights, named in its card's recipe."""
    model, card = _load_pair(path)
    model.context.weights.copy_(weights.half().float())  # what the half-precision file will hold
    shipped = model.context.weights
    recipe = dict(card.recipe)
    recipe["context"] = {
        "what": "each logit re-read in study context by a logistic regression per structure type",
        "features": list(CONTEXT_FEATURES),
        "weights": {name: [round(float(v), 4) for v in shipped[t]] for t, name in enumerate(CONTEXT_TYPES)},
        "l2": l2,
        "fitted_on": fitted_on,
    }
    return save_model(path, model, replace(card, recipe=recipe, metrics={}), half=True)


def fit_pair_context(
    out: Path, samples: Sequence[SliceSample], folds: Mapping[str, int], k: int, l2: float = CONTEXT_L2
) -> ModelCard:
    """Fit the study context of the pair at `out` and of its k fold pairs; rewrite them; returns the final card.

    Each fold pair's held-out logits (context off) are collected first. Fold pair f then gets weights fitted on
    the other folds' held-out logits and labels, never on its own held-out studies, so `ccfnet evaluate --folds`
    stays out of fold; the final pair gets weights fitted on all of them.
    """
    fold_of = np.array([folds[s.study_id] for s in samples])
    logits = np.full((len(samples), NUM_STRUCTURES), np.nan)
    for f in range(k):
        members = np.flatnonzero(fold_of == f)
        if members.size == 0:
            raise ValueError(f"no study of fold {f} to fit the study context on")
        model, card = _load_pair(fold_checkpoint(out, f))
        model.context.weights.copy_(identity_weights())
        images = [samples[int(i)].image for i in members]
        logits[members] = point_logits(model, images, card.input_size, card.stride, torch.device("cpu"))
    targets = np.stack([s.abnormal_targets() for s in samples])
    for f in range(k):
        rest = fold_of != f
        weights = fit_context(logits[rest], targets[rest], l2)
        others = ", ".join(str(g) for g in range(k) if g != f)
        _write_context(fold_checkpoint(out, f), weights, f"out-of-fold logits of folds {others} "
                       f"({int(rest.sum())} studies)", l2)
    fitted_on = f"out-of-fold logits of all {k} folds ({len(samples)} studies)"
    return _write_context(out, fit_context(logits, targets, l2), fitted_on, l2)
