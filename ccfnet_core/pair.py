"""Assemble a localiser and one or more classifier checkpoints into one checkpoint (`<arch>-pair`, `<arch>-ens<n>`).

Trained from scratch, one CCF-Net trades localisation for classification through the weight of its BCE terms
(docs/model.md): a low weight counts the levels best, a high one grades them best. A pair runs one network of each
and reads the classifier's logits at the localiser's points (`ccfnet_core.model.PairedCCFNet`); with
`logits="mean"` it reads the mean of both networks' logits there, a two-member ensemble for the grade. More
classifiers (the same recipe, other seeds) make an ensemble: their logits are averaged, and with `logits="mean"`
every network counts equally. The card names every source by version and weights digest. Fold models beside the
sources (`<stem>.folds/fold<k>.pt`) are combined fold by fold, so `ccfnet evaluate --folds` scores the result out
of fold exactly as it scores one network.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ccfnet_core.checkpoint import ModelCard, load_model, new_card, save_model, source_record
from ccfnet_core.evaluate import fold_checkpoint
from ccfnet_core.model import PAIR_LOGITS, CCFNet, PairedCCFNet, combined_arch, is_combined

Classifiers = Path | Sequence[Path]


_LOGITS_TEXT = {
    "classifier": "P(abnormal) from the classifier's logits there",
    "mean": "P(abnormal) from the mean of both networks' logits there",
}
_ENSEMBLE_LOGITS_TEXT = {
    "classifier": "P(abnormal) from the mean of the classifiers' logits there",
    "mean": "P(abnormal) from the mean of every network's logits there",
}


def check_logits(logits: str, networks: int = 2) -> float:
    """The localiser's logit share of a `logits` mode (`PAIR_LOGITS`) among `networks`; ValueError naming the modes."""
    if logits not in PAIR_LOGITS:
        raise ValueError(f"pair logits must be one of {', '.join(PAIR_LOGITS)}, not {logits!r}")
    return PAIR_LOGITS[logits](networks)


def _as_list(classifiers: Classifiers) -> list[Path]:
    paths = [classifiers] if isinstance(classifiers, Path) else list(classifiers)
    if not paths:
        raise ValueError("a pair needs at least one classifier")
    return paths


def pair_card(
    localiser: ModelCard,
    classifiers: Sequence[ModelCard],
    loc_path: Path,
    cls_paths: Sequence[Path],
    logits: str = "classifier",
) -> ModelCard:
    """The combined card: the localiser's preprocessing and data, every source in the recipe, no metrics yet."""
    check_logits(logits)
    if any(is_combined(card.arch) for card in (localiser, *classifiers)):
        raise ValueError("a pair is made of single networks, not of pairs")
    for classifier in classifiers:
        for name in ("arch", "input_size", "stride", "preprocessing", "structures"):
            if getattr(localiser, name) != getattr(classifier, name):
                raise ValueError(
                    f"localiser and classifier differ in {name}: "
                    f"{getattr(localiser, name)} vs {getattr(classifier, name)}"
                )
        if localiser.phantom_only != classifier.phantom_only:
            raise ValueError("one source is phantom-only and the other is not")
    sources = [source_record(card, path) for card, path in zip(classifiers, cls_paths, strict=True)]
    texts = _LOGITS_TEXT if len(classifiers) == 1 else _ENSEMBLE_LOGITS_TEXT
    recipe: dict[str, object] = {
        "pair": f"points (heatmaps, offsets) from the localiser, {texts[logits]}",
        "logits": logits,
        "localiser": source_record(localiser, loc_path),
    }
    recipe.update({"classifier": sources[0]} if len(sources) == 1 else {"classifiers": sources})
    limitations = (*localiser.limitations, *(item for card in classifiers for item in card.limitations))
    return new_card(
        arch=combined_arch(localiser.arch, len(classifiers)),
        input_size=localiser.input_size,
        stride=localiser.stride,
        sigma=localiser.sigma,
        training_data=localiser.training_data,
        intended_use=localiser.intended_use,
        phantom_only=localiser.phantom_only,
        recipe=recipe,
        limitations=tuple(dict.fromkeys(limitations)),
    )


def assemble_pair(
    localiser: Path, classifier: Classifiers, out: Path, half: bool = True, logits: str = "classifier"
) -> ModelCard:
    """Write the pair (or, with several classifiers, the ensemble) of single-network checkpoints to `out`."""
    cls_paths = _as_list(classifier)
    share = check_logits(logits, 1 + len(cls_paths))
    loc_model, loc_card = load_model(localiser)
    loaded = [load_model(path) for path in cls_paths]
    card = pair_card(loc_card, [c for _, c in loaded], localiser, cls_paths, logits)
    singles = [m for m in (loc_model, *(m for m, _ in loaded)) if isinstance(m, CCFNet)]
    if len(singles) != 1 + len(loaded):
        raise ValueError("a pair is made of single networks, not of pairs")
    loc, first, *extra = singles
    return save_model(out, PairedCCFNet(loc, first, share, extra_classifiers=extra), card, half=half)


def pair_members(
    localiser: Path, classifier: Classifiers, out: Path, folds: int
) -> list[tuple[Path, list[Path], Path]]:
    """(localiser, classifiers, result) paths of each fold model (`<stem>.folds/fold<k>.pt`), then the final one."""
    cls_paths = _as_list(classifier)
    fold = fold_checkpoint
    members = [(fold(localiser, k), [fold(c, k) for c in cls_paths], fold(out, k)) for k in range(folds)]
    return [*members, (localiser, cls_paths, out)]


def assemble_pair_with_folds(
    localiser: Path, classifier: Classifiers, out: Path, folds: int, logits: str = "classifier"
) -> ModelCard:
    """The pair (or ensemble) of the final models and of each of the `folds` fold models (all must exist)."""
    check_logits(logits)
    members = pair_members(localiser, classifier, out, folds)
    for source in (path for loc, cls, _ in members[:-1] for path in (loc, *cls)):
        if not source.is_file():
            raise FileNotFoundError(f"pairing the fold models needs {source}")
    for loc, cls, pair in members:
        card = assemble_pair(loc, cls, pair, logits=logits)
    return card
