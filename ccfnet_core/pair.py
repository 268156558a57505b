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
from ccfnet_core.model import (
    PAIR_LOGITS,
    CCFNet,
    GradedCCFNet,
    Network,
    PairedCCFNet,
    RefinedCCFNet,
    combined_arch,
    is_combined,
)
from ccfnet_core.patch_training import attach_fold_by_fold, combined_card

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


SECOND_LOCALISER_LIMITATION = (
    "points from the mean of two localisers' maps: where they disagree on a level, the peak can fall between"
)


def _inner_pair(model: Network) -> PairedCCFNet:
    """The pair or ensemble inside a combined, graded or refined model; ValueError for a single network."""
    inner: object = model
    while isinstance(inner, RefinedCCFNet | GradedCCFNet):
        inner = inner.network
    if not isinstance(inner, PairedCCFNet):
        raise ValueError("a second localiser is added to a pair, not to a single network")
    return inner


def add_localiser(model: Path, localiser: Path, out: Path, int8: bool = False) -> ModelCard:
    """Write `model` (a pair, graded or refined or not) with `localiser` averaged into its points
    (`<arch>-loc2`): the mean of both localisers' 44 maps, everything else unchanged (`PairedCCFNet`). `int8`
    stores the weights at a byte each (`checkpoint.quantise_int8`), float16 otherwise."""
    network, card = load_model(model)
    extra, extra_card = load_model(localiser)
    pair = _inner_pair(network)
    if not isinstance(extra, CCFNet):
        raise ValueError(f"{localiser} is not a single network")
    if len(pair.extra_localisers):
        raise ValueError(f"{model} already has two localisers")
    if len(pair.extra_classifiers):
        raise ValueError(f"{model} is an ensemble: a second localiser is added to a pair")
    for name in ("input_size", "stride", "preprocessing", "structures", "phantom_only"):
        if getattr(card, name) != getattr(extra_card, name):
            ours, theirs = getattr(card, name), getattr(extra_card, name)
            raise ValueError(f"model and localiser differ in {name}: {ours} vs {theirs}")
    if extra.spec != pair.spec:
        raise ValueError(f"a pair needs one architecture, not {pair.spec.name} + {extra.spec.name}")
    pair.extra_localisers.append(extra)
    single = combined_arch(extra_card.arch, 1)
    if not card.arch.startswith(single):
        raise ValueError(f"{model} ({card.arch}) is not made of {extra_card.arch} networks")
    arch = combined_arch(extra_card.arch, 1, localisers=2) + card.arch[len(single) :]
    recipe = dict(card.recipe)
    recipe["second_localiser"] = source_record(extra_card, localiser)
    located = combined_card(
        card,
        arch,
        card.outputs + "; points from the mean of two localisers' maps",
        SECOND_LOCALISER_LIMITATION,
        recipe,
    )
    return save_model(out, network, located, half=True, int8=int8)


def add_localiser_with_folds(model: Path, localiser: Path, out: Path, folds: int, int8: bool = False) -> ModelCard:
    """`add_localiser` for each of the `folds` fold models (all must exist), then for the final ones."""
    return attach_fold_by_fold(
        "second localiser",
        model,
        [localiser],
        out,
        folds,
        lambda net, parts, result: add_localiser(net, parts[0], result, int8),
    )
