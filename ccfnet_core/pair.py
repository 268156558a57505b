"""Assemble a localiser and a classifier checkpoint into one pair checkpoint (`<arch>-pair`).

Trained from scratch, one CCF-Net trades localisation for classification through the weight of its BCE terms
(docs/model.md): a low weight counts the levels best, a high one grades them best. A pair runs one network of each
and reads the classifier's logits at the localiser's points (`ccfnet_core.model.PairedCCFNet`); with
`logits="mean"` it reads the mean of both networks' logits there, a two-member ensemble for the grade. Its card names
both sources by version and weights digest. Fold models beside both sources (`<stem>.folds/fold<k>.pt`) are paired
fold by fold, so `ccfnet evaluate --folds` scores the pair out of fold exactly as it scores one network.
"""

from __future__ import annotations

from pathlib import Path

from ccfnet_core.checkpoint import ModelCard, load_model, new_card, save_model
from ccfnet_core.evaluate import fold_checkpoint
from ccfnet_core.model import PAIR_LOGITS, PAIR_SUFFIX, CCFNet, PairedCCFNet


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
