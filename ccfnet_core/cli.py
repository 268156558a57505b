"""Research commands: model-info, train, evaluate, predict, pair, train-grader, attach-grader, train-refiner,
attach-refiner, phantom. Thin: parse,
delegate, exit code.

Errors a user can cause (missing files, bad options, unusable data) become a one-line message and exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import typer

F = TypeVar("F", bound=Callable[..., Any])


class UsageProblem(Exception):
    """A problem with the user's input, reported without a traceback."""


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _guarded(func: F) -> F:
    """Turn the library's input errors into a clear message and exit code 2 (the CLI edge)."""
    import functools

    from ccfnet_core.checkpoint import CheckpointError
    from ccfnet_core.series_selection import NoEligibleSeries

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except NoEligibleSeries as exc:
            _fail(f"no eligible series: {exc.reason}")
        except (UsageProblem, CheckpointError, FileNotFoundError, ValueError) as exc:
            _fail(str(exc))
        return None

    return wrapper  # type: ignore[return-value]


def _emit(data: Any, as_json: bool, text: Callable[[], None]) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=_json_default))
    else:
        text()


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --------------------------------------------------------------------------------------------- model-info
@_guarded
def model_info(
    arch: str = typer.Option(
        "r18-msc", help="r18-msc, r50-msc, r18, r50, r18-msc-pair, ... (+ -graded: MACs count the networks only)"
    ),
    input_size: int = typer.Option(512, help="square input size for the MAC count"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Parameters and multiply-accumulates of an architecture (as the paper counted them)."""
    from ccfnet_core.model import count_macs, count_parameters, create_model

    model = create_model(arch)
    info: dict[str, Any] = {
        "arch": arch,
        "input_size": input_size,
        "params": count_parameters(model),
        "macs": count_macs(model, input_size, paper_graph=True),
        "macs_executed": count_macs(model, input_size, paper_graph=False),
        "stride": model.stride,
    }
    _emit(
        info,
        as_json,
        lambda: typer.echo(
            f"{arch}: {info['params'] / 1e6:.2f} M params, {info['macs'] / 1e9:.2f} G MACs at "
            f"1x3x{input_size}x{input_size} (paper's count; {info['macs_executed'] / 1e9:.2f} G executed)"
        ),
    )


# --------------------------------------------------------------------------------------------- train
def _load_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageProblem(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        loaded = yaml.safe_load(text) or {}
    else:
        loaded = tomllib.loads(text)
    if not isinstance(loaded, dict):
        raise UsageProblem(f"{path}: expected a table of options")
    return dict(loaded.get("train", loaded))


@_guarded
def train(
    data: Path = typer.Option(..., help="tianchi-slices folder or challenge-layout folder"),
    out: Path = typer.Option(..., help="run folder: state.pt (resume), history.csv, model.pt"),
    config: Path | None = typer.Option(None, help="TOML or YAML file of training options"),
    arch: str | None = typer.Option(None),
    input_size: int | None = typer.Option(None),
    sigma: float | None = typer.Option(None),
    epochs: int | None = typer.Option(None),
    repeats: int | None = typer.Option(None, help="times each study is seen per epoch"),
    batch_size: int | None = typer.Option(None),
    lr: float | None = typer.Option(None),
    t0: int | None = typer.Option(None, help="epochs of the first cosine cycle"),
    class_weight: float | None = typer.Option(None, help="weight of the two BCE terms"),
    aug_strength: float | None = typer.Option(None),
    device: str | None = typer.Option(None, help="auto, cpu or cuda"),
    seed: int | None = typer.Option(None),
    init_from: str | None = typer.Option(None, help="start from this checkpoint's weights"),
    max_steps: int | None = typer.Option(None, help="stop after this many steps (smoke runs)"),
    folds: Path | None = typer.Option(None, help="folds file; made (k folds, by --fold-seed) if it is missing"),
    fold: int | None = typer.Option(None, help="hold this fold out and report on it"),
    k: int = typer.Option(4, help="number of folds when the folds file is made"),
    fold_seed: int = typer.Option(2022, help="seed of the fold split"),
    phantom_only: bool = typer.Option(False, help="mark the card as phantom-only (not for real images)"),
    half: bool = typer.Option(False, help="save the exported weights in float16"),
) -> None:
    """Train CCF-Net (resumes from OUT/state.pt), then export OUT/model.pt with its model card."""
    from tqdm import tqdm

    from ccfnet_core.datasets import read_dataset
    from ccfnet_core.evaluate import score_for_training
    from ccfnet_core.folds import load_folds, make_folds, save_folds
    from ccfnet_core.train import TrainConfig, Trainer

    options = _load_config_file(config) if config else {}
    flags = {
        "arch": arch, "input_size": input_size, "sigma": sigma, "epochs": epochs, "repeats": repeats,
        "batch_size": batch_size, "lr": lr, "t0": t0, "class_weight": class_weight, "aug_strength": aug_strength,
        "device": device, "seed": seed, "init_from": init_from, "max_steps": max_steps,
    }
    options.update({key: value for key, value in flags.items() if value is not None})
    cfg = TrainConfig.from_mapping(options)
    samples = read_dataset(data)
    pool = samples if cfg.include_flagged else [s for s in samples if not s.flag]
    train_set, val_set = pool, []
    if fold is not None:
        folds_path = folds or out / "folds.json"
        if not folds_path.is_file():
            save_folds(folds_path, make_folds([s.study_id for s in samples], k, fold_seed), k, fold_seed)
        assignment = load_folds(folds_path)
        train_set = [s for s in pool if assignment[s.study_id] != fold]
        val_set = [s for s in samples if not s.flag and assignment[s.study_id] == fold]
    typer.echo(f"training {cfg.arch} at {cfg.input_size}px on {len(train_set)} studies"
               f"{f', watching {len(val_set)}' if val_set else ''}; device {cfg.device}", err=True)
    bars: dict[str, Any] = {}

    def progress(kind: str, done: int, total: int) -> None:
        bar = bars.get(kind)
        if bar is None or bar.total != total or (done == 1 and kind == "step"):
            if bar is not None:
                bar.close()
            bar = bars[kind] = tqdm(total=total, desc=kind, leave=kind == "epoch", file=sys.stderr, position=0
                                    if kind == "epoch" else 1)
        bar.n = done
        bar.refresh()

    trainer = Trainer(cfg, train_set, out, val_set, score_for_training if val_set else None, progress)
    if trainer.try_resume():
        typer.echo(f"resuming at epoch {trainer.epoch}", err=True)
    result = trainer.fit()
    for bar in bars.values():
        bar.close()
    card = trainer.export(
        out / "model.pt",
        {
            "training_data": cfg.training_data or f"{len(train_set)} studies from {data}",
            "intended_use": "demonstration and tests only" if phantom_only else "research",
            "phantom_only": phantom_only,
            "metrics": {k2: v for k2, v in result.items() if isinstance(v, int | float)},
            "limitations": ("trained on synthetic phantoms only: meaningless on real images",)
            if phantom_only else (),
        },
        half=half,
    )
    from ccfnet_core.plots import learning_curves

    learning_curves(out / "learning_curves.png", [out / "history.csv"])
    typer.echo(json.dumps({"model": str(out / "model.pt"), "device_uid": card.device_uid, **card.metrics},
                          default=_json_default))


# --------------------------------------------------------------------------------------------- evaluate
@_guarded
def evaluate(
    data: Path = typer.Option(..., help="tianchi-slices folder or challenge-layout folder"),
    checkpoint: Path | None = typer.Option(None, help="default: $CCFNET_MODEL_PATH or the shipped model"),
    folds: Path | None = typer.Option(None, help="out-of-fold: each study predicted by its fold's model"),
    out: Path = typer.Option(Path("runs/evaluate"), help="folder for figures and metrics.json"),
    device: str = typer.Option("auto"),
    include_flagged: bool = typer.Option(False, help="also score studies whose labels are flagged"),
    as_json: bool = typer.Option(False, "--json", help="print all metrics as JSON"),
    record_in_card: bool = typer.Option(False, help="with --folds: write the out-of-fold metrics into the card"),
) -> None:
    """All metrics per structure and overall, confusion matrices, and figures (overlay, errors, ROC)."""
    from ccfnet_core import evaluate as card_metrics
    from ccfnet_core.checkpoint import default_model_path
    from ccfnet_core.datasets import read_dataset
    from ccfnet_core.evaluate import per_fold_metrics, predict_out_of_fold, summarise, write_figures
    from ccfnet_core.folds import load_folds
    from ccfnet_core.inference import Predictor

    checkpoint = checkpoint or default_model_path()
    samples = read_dataset(data)
    skipped = [s.study_id for s in samples if s.flag]
    if not include_flagged:
        samples = [s for s in samples if not s.flag]
    if not samples:
        raise UsageProblem(f"no studies to evaluate in {data}")
    if record_in_card and not folds:
        raise UsageProblem("--record-in-card records cross-validation metrics: it needs --folds")
    if folds:
        fold_of = load_folds(folds)
        predictions = predict_out_of_fold(samples, checkpoint, fold_of, device)
    else:
        predictor = Predictor.from_checkpoint(checkpoint, device)
        predictions = predictor.predict([s.image for s in samples])
    summary = summarise(samples, predictions)
    summary["checkpoint"] = str(checkpoint)
    summary["mode"] = "out-of-fold" if folds else "single model"
    summary["excluded_flagged"] = [] if include_flagged else skipped
    summary["figures"] = write_figures(out, samples, predictions)
    if folds and record_in_card:
        per_fold = per_fold_metrics(samples, predictions, fold_of)
        summary["per_fold"] = per_fold
        card_metrics.record_in_card(checkpoint, summary, per_fold, len(per_fold))
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")

    def text() -> None:
        typer.echo(f"{summary['mode']} evaluation of {checkpoint} on {len(samples)} studies")
        for key in ("L-Disc", "L-Vertebra", "C-Disc", "C-Vertebra", "Score"):
            typer.echo(f"  {key:<12}{summary[key]:8.2f}")
        typer.echo(f"  {'macro-F1':<12}{100 * summary['challenge_macro_f1']:8.2f}  (challenge metric)")
        typer.echo(f"  mean error {summary['mean_error_mm']:.2f} mm, median {summary['median_error_mm']:.2f} mm")
        figures = summary.get("reading", {}).get("intervals", {})
        for key in ("Score", "challenge_macro_f1", "ECE-Vertebra", "ECE-Disc", "sensitivity-Vertebra",
                    "specificity-Vertebra", "sensitivity-Disc", "specificity-Disc", "level_check_flags_shifted",
                    "level_check_flags_other"):
            if key in figures:
                estimate, low, high = figures[key]
                typer.echo(f"  {key:<28}{estimate:8.3f}  95% [{low:.3f}, {high:.3f}] (bootstrap over studies)")
        typer.echo(f"figures and metrics.json in {out}")

    _emit(summary, as_json, text)


@_guarded
def fit_readout(
    data: Path = typer.Option(..., help="tianchi-slices folder or challenge-layout folder"),
    folds: Path = typer.Option(..., help="folds file: the fold models beside the checkpoint give out-of-fold outputs"),
    checkpoint: Path | None = typer.Option(None, help="default: $CCFNET_MODEL_PATH or the shipped model"),
    device: str = typer.Option("auto"),
) -> None:
    """Fit calibration, operating points, the disc grade rule and the level check on out-of-fold outputs, and write
    them into the cards: each fold model's fitted on the other folds (so `evaluate --folds` is nested), the
    checkpoint's on all of them (`ccfnet_core.fit_readout`)."""
    from ccfnet_core.checkpoint import default_model_path
    from ccfnet_core.fit_readout import ReadoutAims, fit_readout_into_cards

    checkpoint = checkpoint or default_model_path()
    samples, fold_of = _usable_with_folds(data, folds)
    readout = fit_readout_into_cards(checkpoint, samples, fold_of, ReadoutAims(), device,
                                     log=lambda line: typer.echo(line, err=True))
    typer.echo(json.dumps({"checkpoint": str(checkpoint), "readout": readout.to_dict()}, default=_json_default))


# --------------------------------------------------------------------------------------------- pair
@_guarded
def pair(
    localiser: Path = typer.Option(..., help="checkpoint whose points the pair gives"),
    classifier: list[Path] = typer.Option(
        ..., help="checkpoint whose P(abnormal) the pair gives at those points; repeat it for an ensemble"
    ),
    out: Path = typer.Option(..., help="pair checkpoint to write"),
    folds: int = typer.Option(0, help="also pair the K fold models beside both (<stem>.folds/fold<k>.pt)"),
    logits: str = typer.Option("classifier", help="P(abnormal) from the classifiers' logits, or every network's mean"),
) -> None:
    """One checkpoint from trained networks: points from the localiser, abnormality from the classifier(s)."""
    from ccfnet_core.pair import assemble_pair, assemble_pair_with_folds, check_logits

    try:
        check_logits(logits)
    except ValueError as exc:
        raise UsageProblem(str(exc)) from exc
    if folds:
        card = assemble_pair_with_folds(localiser, classifier, out, folds, logits)
    else:
        card = assemble_pair(localiser, classifier, out, logits=logits)
    typer.echo(json.dumps({"model": str(out), "arch": card.arch, "weights_sha256": card.weights_sha256,
                           "fold_models": folds, "logits": logits}))


@_guarded
def add_localiser(
    model: Path = typer.Option(..., help="pair checkpoint (graded or refined or not) to add it to"),
    localiser: Path = typer.Option(..., help="a second localiser (same architecture), averaged into the points"),
    out: Path = typer.Option(..., help="checkpoint to write (<arch>-loc2)"),
    folds: int = typer.Option(0, help="also add the K fold localisers to the K fold models (<stem>.folds/)"),
    int8: bool = typer.Option(False, help="store conv weights as int8 per output channel (float16 otherwise)"),
) -> None:
    """One checkpoint: the model with its points from the mean of two localisers' maps, everything else kept."""
    from ccfnet_core.pair import add_localiser as add
    from ccfnet_core.pair import add_localiser_with_folds

    if folds:
        card = add_localiser_with_folds(model, localiser, out, folds, int8)
    else:
        card = add(model, localiser, out, int8)
    typer.echo(json.dumps({"model": str(out), "arch": card.arch, "weights_sha256": card.weights_sha256,
                           "dtype": card.dtype, "fold_models": folds}))


# --------------------------------------------------------------------------------------------- grader
@_guarded
def train_grader(
    data: Path = typer.Option(..., help="tianchi-slices folder or challenge-layout folder"),
    folds: Path = typer.Option(..., help="folds file: one grader per fold (held out), then the final one"),
    out: Path = typer.Option(..., help="final grader checkpoint; fold graders go to <stem>.folds/fold<k>.pt"),
    epochs: int = typer.Option(30),
    seed: int = typer.Option(0),
) -> None:
    """Train the patch grader of every fold and the final one on all usable studies (those that exist are kept)."""
    from ccfnet_core.grading import GraderRecipe, train_grader_folds

    samples, fold_of = _usable_with_folds(data, folds)
    recipe = GraderRecipe(epochs=epochs, seed=seed)
    training_data = f"{data.name}, unflagged studies"
    paths = train_grader_folds(samples, fold_of, out, recipe, training_data,
                               log=lambda line: typer.echo(line, err=True))
    typer.echo(json.dumps({"grader": str(out), "fold_graders": [str(p) for p in paths[:-1]]}))


@_guarded
def attach_grader(
    network: Path = typer.Option(..., help="network checkpoint (single, pair or ensemble) that finds the points"),
    grader: list[Path] = typer.Option(..., help="patch grader checkpoint (ccfnet train-grader); repeat it to average"),
    out: Path = typer.Option(..., help="graded checkpoint to write"),
    folds: int = typer.Option(0, help="also attach the K fold graders to the K fold networks (<stem>.folds/)"),
    network_share: float = typer.Option(0.0, help="weight of the network's own logit beside the grader's, 0..1"),
) -> None:
    """One checkpoint: points from the network, P(abnormal) from the patch grader at them (and the network's)."""
    from ccfnet_core.grading import attach_grader as attach
    from ccfnet_core.grading import attach_grader_with_folds

    if not 0.0 <= network_share < 1.0:
        raise UsageProblem(f"--network-share must be in [0, 1), not {network_share}")
    if folds:
        card = attach_grader_with_folds(network, grader, out, folds, network_share)
    else:
        card = attach(network, grader, out, network_share)
    typer.echo(json.dumps({"model": str(out), "arch": card.arch, "weights_sha256": card.weights_sha256,
                           "fold_models": folds, "network_share": network_share}))


@_guarded
def train_grade_grader(
    data: Path = typer.Option(..., help="tianchi-slices folder or challenge-layout folder"),
    folds: Path = typer.Option(..., help="folds file: one grade grader per fold (held out), then the final one"),
    out: Path = typer.Option(..., help="final grade grader checkpoint; fold ones go to <stem>.folds/fold<k>.pt"),
    epochs: int = typer.Option(30),
    seed: int = typer.Option(0),
    fold: list[int] | None = typer.Option(None, help="train only this fold (-1: the final one); repeatable"),
) -> None:
    """Train the disc grade grader (normal, bulge, protrusion, extrusion, Schmorl's node) of every fold and the
    final one on all usable studies (those that exist are kept)."""
    from ccfnet_core.disc_grades import GradeRecipe, train_grade_grader_folds

    samples, fold_of = _usable_with_folds(data, folds)
    paths = train_grade_grader_folds(samples, fold_of, out, GradeRecipe(epochs=epochs, seed=seed),
                                     f"{data.name}, unflagged studies", log=lambda line: typer.echo(line, err=True),
                                     only=fold or None)
    typer.echo(json.dumps({"grade_grader": str(out), "fold_grade_graders": [str(p) for p in paths[:-1]]}))


@_guarded
def attach_grade_grader(
    model: Path = typer.Option(..., help="graded (or refined graded) checkpoint to add the disc grade grader to"),
    grade_grader: Path = typer.Option(..., help="disc grade grader checkpoint (ccfnet train-grade-grader)"),
    out: Path = typer.Option(..., help="checkpoint to write (<...>-graded<n>-grades)"),
    folds: int = typer.Option(0, help="also attach the K fold grade graders to the K fold models (<stem>.folds/)"),
    int8: bool = typer.Option(False, help="store conv weights as int8 per output channel (float16 otherwise)"),
) -> None:
    """One checkpoint: the model unchanged, plus a disc grade (normal, bulge, protrusion, extrusion, Schmorl's node)
    read at each found disc."""
    from ccfnet_core.disc_grades import attach_grade_grader as attach
    from ccfnet_core.disc_grades import attach_grade_grader_with_folds

    if folds:
        card = attach_grade_grader_with_folds(model, grade_grader, out, folds, int8)
    else:
        card = attach(model, grade_grader, out, int8)
    typer.echo(json.dumps({"model": str(out), "arch": card.arch, "weights_sha256": card.weights_sha256,
                           "dtype": card.dtype, "fold_models": folds}))


# --------------------------------------------------------------------------------------------- refiner
@_guarded
def train_refiner(
    data: Path = typer.Option(..., help="tianchi-slices folder or challenge-layout folder"),
    folds: Path = typer.Option(..., help="folds file: one refiner per fold (held out), then the final one"),
    out: Path = typer.Option(..., help="final refiner checkpoint; fold refiners go to <stem>.folds/fold<k>.pt"),
    epochs: int = typer.Option(30),
    seed: int = typer.Option(0),
) -> None:
    """Train the point refiner of every fold and the final one on all usable studies (those that exist are kept)."""
    from ccfnet_core.refining import RefinerRecipe, train_refiner_folds

    samples, fold_of = _usable_with_folds(data, folds)
    paths = train_refiner_folds(samples, fold_of, out, RefinerRecipe(epochs=epochs, seed=seed),
                                f"{data.name}, unflagged studies", log=lambda line: typer.echo(line, err=True))
    typer.echo(json.dumps({"refiner": str(out), "fold_refiners": [str(p) for p in paths[:-1]]}))


@_guarded
def attach_refiner(
    network: Path = typer.Option(..., help="network checkpoint (single, pair, ensemble or graded)"),
    refiner: list[Path] = typer.Option(..., help="point refiner checkpoint (ccfnet train-refiner); repeat to average"),
    out: Path = typer.Option(..., help="refined checkpoint to write"),
    folds: int = typer.Option(0, help="also attach the K fold refiners to the K fold networks (<stem>.folds/)"),
) -> None:
    """One checkpoint: the network's points moved by the point refiner(s), then graded there if it grades."""
    from ccfnet_core.refining import attach_refiner as attach
    from ccfnet_core.refining import attach_refiner_with_folds

    card = attach_refiner_with_folds(network, refiner, out, folds) if folds else attach(network, refiner, out)
    typer.echo(json.dumps({"model": str(out), "arch": card.arch, "weights_sha256": card.weights_sha256,
                           "fold_models": folds}))


def _usable_with_folds(data: Path, folds: Path) -> tuple[list[Any], dict[str, int]]:
    """The unflagged studies of `data` and the folds file, every study in it (else a usage problem)."""
    from ccfnet_core.datasets import read_dataset
    from ccfnet_core.folds import load_folds

    samples = [s for s in read_dataset(data) if not s.flag]
    fold_of = load_folds(folds)
    missing = sorted({s.study_id for s in samples} - fold_of.keys())
    if missing:
        raise UsageProblem(f"{len(missing)} studies are not in {folds} (e.g. {missing[0]})")
    return samples, fold_of


# --------------------------------------------------------------------------------------------- predict
def _read_input(path: Path) -> Any:
    from ccfnet_core.datasets import read_dicom_study
    from ccfnet_core.sample import SliceSample, rescale_to_unit

    nan_points = np.full((11, 2), np.nan)
    no_labels: tuple[frozenset[str], ...] = (frozenset(),) * 11
    if path.is_dir():
        return read_dicom_study(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.suffix == ".npy":
        array = np.load(path)
        if array.ndim != 2:
            raise UsageProblem(f"{path}: expected a 2-D slice, got shape {array.shape}")
        channel = rescale_to_unit(array)
        return SliceSample(path.stem, np.stack([channel] * 3), nan_points, no_labels, (1.0, 1.0))
    import pydicom
    from pydicom.errors import InvalidDicomError

    from ccfnet_core.series_selection import load_input_slices

    try:
        dataset = pydicom.dcmread(path)
    except (InvalidDicomError, OSError) as exc:
        raise UsageProblem(f"{path}: not a readable DICOM file ({exc})") from exc
    image, spacing = load_input_slices([dataset, dataset, dataset])
    return SliceSample(str(dataset.get("SOPInstanceUID", path.stem)), image, nan_points, no_labels, spacing)


@_guarded
def predict(
    path: Path = typer.Argument(..., help="DICOM study folder, one DICOM file, or a .npy slice"),
    checkpoint: Path | None = typer.Option(None, help="default: $CCFNET_MODEL_PATH or the shipped model"),
    png: Path | None = typer.Option(None, help="write an overlay PNG here"),
    device: str = typer.Option("auto"),
) -> None:
    """The 11 points and diagnoses of one slice as JSON (and an overlay PNG with --png)."""
    from ccfnet_core.checkpoint import default_model_path
    from ccfnet_core.inference import Predictor
    from ccfnet_core.structures import STRUCTURES, grade_word, label_name, structure_type

    sample = _read_input(path)
    predictor = Predictor.from_checkpoint(checkpoint or default_model_path(), device)
    prediction = predictor.predict([sample.image])[0]  # read through the card's readout
    findings = []
    for k, name in enumerate(STRUCTURES):
        label = prediction.labels[k]
        findings.append({
            "structure": name,
            "type": structure_type(k).value,
            "x": round(float(prediction.points[k, 0]), 2),
            "y": round(float(prediction.points[k, 1]), 2),
            "label": label,
            "diagnosis": label_name(k, label),
            "grade": grade_word(k, prediction.grades[k]),
            "schmorl_node": bool(prediction.schmorl is not None and prediction.schmorl[k]),
            "probability_abnormal": round(float(prediction.probabilities[k]), 4),
            "confidence": round(float(prediction.confidences[k]), 4),
        })
    card = predictor.card
    result = {
        "input": str(path),
        "study": sample.study_id,
        "model": {"name": card.display_name, "version": card.version, "device_uid": card.device_uid,
                  "phantom_only": card.phantom_only},
        "findings": findings,
        "level_warning": prediction.level_warning,
    }
    if png:
        from ccfnet_core.plots import overlay

        result["png"] = str(overlay(png, [sample], [prediction], columns=1, title=card.display_name))
    typer.echo(json.dumps(result, indent=2))


# --------------------------------------------------------------------------------------------- phantom
@_guarded
def phantom(
    out: Path = typer.Option(..., help="folder for the studies and annotations.json"),
    studies: int = typer.Option(10, min=1),
    seed: int = typer.Option(0),
    size: int = typer.Option(256, help="rows and columns of each image"),
) -> None:
    """Synthetic lumbar MR studies as real DICOM files, in the challenge layout with its annotation JSON."""
    from tqdm import tqdm

    from ccfnet_core.phantom import write_phantom_studies

    with tqdm(total=studies, desc="phantom studies", file=sys.stderr) as bar:
        truths = write_phantom_studies(out, studies, seed, rows=size, cols=size, progress=lambda n: bar.update(1))
    typer.echo(json.dumps({"out": str(out), "studies": len(truths), "annotations": str(out / "annotations.json")}))


def register(app: typer.Typer) -> None:
    """Add the research commands to a Typer app (the `ccfnet` CLI mounts them)."""
    app.command("model-info")(model_info)
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("fit-readout")(fit_readout)
    app.command("predict")(predict)
    app.command("pair")(pair)
    app.command("add-localiser")(add_localiser)
    app.command("train-grader")(train_grader)
    app.command("attach-grader")(attach_grader)
    app.command("train-grade-grader")(train_grade_grader)
    app.command("attach-grade-grader")(attach_grade_grader)
    app.command("train-refiner")(train_refiner)
    app.command("attach-refiner")(attach_refiner)
    app.command("phantom")(phantom)
