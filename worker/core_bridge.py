"""The one module of `worker` that imports `ccfnet_core` (STYLE.md, layering).

Everything the service needs from the model library passes through here: the research commands, loading the
model once per process, and analysing one study's files into plain values the rest of the worker can use.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import typer
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

log = logging.getLogger("worker.model")


def register_research_commands(app: typer.Typer) -> None:
    """Mount the research commands of ccfnet_core on the service CLI."""
    from ccfnet_core.cli import register

    register(app)


class NoEligibleInput(Exception):
    """The study has no series the model can read; `reason` says what was found."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotLumbarSpine(Exception):
    """The anatomy gate declined the study: what the model would read is not a sagittal lumbar spine MR.

    `rule` names the rule that declined (ccfnet_core.anatomy_gate.GateRule: modality, body_part, description,
    plane, order, spacing, confidence), `reason` says why in words; `source` is the header of the slice that was
    looked at (the declined SR's evidence), `model` the checkpoint that would have run (the SR names it).
    """

    def __init__(
        self,
        rule: str,
        reason: str,
        *,
        series_uid: str,
        source: Dataset,
        model: ModelIdentity,
        measurements: dict[str, float] | None = None,
    ) -> None:
        super().__init__(reason)
        self.rule = rule
        self.reason = reason
        self.series_uid = series_uid
        self.source = source
        self.model = model
        self.measurements = dict(measurements or {})


class UnreadableInput(Exception):
    """A spooled file the model needs could not be read as DICOM."""


class ModelUnavailable(Exception):
    """The checkpoint is missing, corrupt or does not match its card (a configuration error, not the study's)."""


class ModelOutOfMemory(Exception):
    """The device ran out of memory during inference; another try may find it free."""


class DeviceUnavailable(Exception):
    """The model device asked for (``cuda``) is not usable by this process's torch."""


def resolve_device(requested: str) -> str:
    """The device ccfnet_core's Predictor puts the model on for ``requested`` (auto, cpu or cuda): ``cuda`` when
    torch sees a CUDA device, else ``cpu``. DeviceUnavailable when ``cuda`` is asked for and there is none.

    Counted with ``torch.cuda.device_count()``, which asks NVML and leaves CUDA uninitialised in this process: the
    parent of a prefork worker must not initialise it, or its forked children could not use the GPU.
    """
    import torch

    if requested == "cpu":
        return "cpu"
    if torch.cuda.device_count() > 0:
        return "cuda"
    if requested == "cuda":
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        raise DeviceUnavailable(f"torch {torch.__version__} ({build}) sees no CUDA device")
    return "cpu"


def _device_label(device: object) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H200)``: called where the model is loaded, so CUDA is initialised already."""
    import torch

    assert isinstance(device, torch.device)
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


@dataclass(frozen=True)
class ModelIdentity:
    """What the loaded checkpoint's model card says it is."""

    name: str
    version: str
    software_version: str
    device_uid: str
    arch: str
    phantom_only: bool
    path: str
    weights_sha256: str  # empty for a card written without one

    @property
    def checkpoint_version(self) -> str:
        """The card's version and the start of its weights' sha256 (``0.1.0@a97c0cb420a4``): checkpoints that
        share a version, as the shipped ones do, are still told apart."""
        return _checkpoint_label(self.version, self.weights_sha256)


def model_card_summary(path: Path) -> str:
    """'CCF-Net R18-MSC 0.1.0@a97c0cb420a4, weights sha256 a97c...' read from the card alone (config check);
    ValueError (CheckpointError) naming the file when it is not a ccfnet checkpoint."""
    from ccfnet_core.checkpoint import read_card

    card = read_card(path)
    digest = card.weights_sha256 or "not recorded"
    return f"{card.display_name} {_checkpoint_label(card.version, card.weights_sha256)}, weights sha256 {digest}"


def _checkpoint_label(version: str, weights_sha256: str) -> str:
    return f"{version}@{weights_sha256[:12]}" if weights_sha256 else version


@dataclass(frozen=True)
class StructureResult:
    """One structure as the worker stores it.

    Points are DICOM image coordinates, the convention of `worker.results` and of SCOORD: (0, 0) is the
    top-left corner of the top-left pixel, so a pixel's centre is at index + 0.5. ccfnet_core predicts pixel
    *indices* (centre at the integer); `_image_point` is the one place that converts.
    """

    name: str
    kind: str
    column: float
    row: float
    label: str  # the challenge class v1..v5 (the metric's; v5 where a Schmorl's node is flagged)
    diagnosis: str  # the label's name
    probability: float  # P(abnormal), calibrated where the model card has a readout
    confidence: float
    # What a person reads (issue 26): the stated grade v1..v4 (vertebra v1/v2), or "abnormal" for a disc whose grade
    # the model does not support with enough confidence; its word; the stated grade's share among the abnormal
    # grades (None where no grade is stated); the Schmorl's node flag.
    grade_label: str = ""
    grade: str = ""
    grade_share: float | None = None
    schmorl_node: bool = False


@dataclass(frozen=True)
class StudyAnalysis:
    series_uid: str
    centre_sop_instance_uid: str
    source: Dataset  # the centre slice, with pixels: the image the findings are on
    selection_reason: str
    structures: tuple[StructureResult, ...]
    heatmaps: np.ndarray | None
    model: ModelIdentity
    seconds: float
    device: str  # where the model ran: cpu, or cuda:N (GPU name)
    skipped_files: tuple[str, ...] = ()  # unreadable files of the study that the choice did without
    level_warning: str | None = None  # a sentence for the reader when the level count may be off by one
    gate: dict[str, float] = field(default_factory=dict)  # what the anatomy gate measured on the model's points


_models: dict[tuple[str, str], object] = {}
_versions: dict[tuple[str, int, int], str] = {}
_models_lock = threading.Lock()


def default_model_path() -> Path:
    from ccfnet_core.checkpoint import default_model_path as core_default

    return core_default()


def _predictor(path: Path, device: str) -> object:
    """Load a checkpoint once per process and device (the worker's model cache); ModelUnavailable if unusable."""
    from ccfnet_core.checkpoint import CheckpointError
    from ccfnet_core.inference import Predictor

    key = (str(path.resolve()), device)
    with _models_lock:
        if key not in _models:
            try:
                resolve_device(device)
            except DeviceUnavailable as exc:
                raise ModelUnavailable(f"model device {device}: {exc}") from exc
            try:
                predictor = Predictor.from_checkpoint(path, device)
            except CheckpointError as exc:
                raise ModelUnavailable(str(exc)) from exc
            log.info("model %s loaded on %s", path, _device_label(predictor.device))
            _models[key] = predictor
        return _models[key]


def checkpoint_version(path: Path) -> str:
    """What results and job keys name a checkpoint by (`ModelIdentity.checkpoint_version`), read from its card
    without building the network; ValueError (CheckpointError) naming the file when it is not a ccfnet checkpoint.

    Cached by the file's path, size and modification time: the sweeper asks every few seconds, and a checkpoint
    replaced in place is read again.
    """
    resolved = path.resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    with _models_lock:
        cached = _versions.get(key)
    if cached is None:
        from ccfnet_core.checkpoint import read_card

        card = read_card(resolved)
        cached = _checkpoint_label(card.version, card.weights_sha256)
        with _models_lock:
            _versions[key] = cached
    return cached


def load_model(path: Path, device: str = "auto") -> ModelIdentity:
    """Load (or find loaded) the model and say what it is."""
    from ccfnet_core.inference import Predictor

    predictor = _predictor(path, device)
    assert isinstance(predictor, Predictor)
    card = predictor.card
    return ModelIdentity(
        name=card.display_name,
        version=card.version,
        software_version=card.software_version,
        device_uid=card.device_uid,
        arch=card.arch,
        phantom_only=card.phantom_only,
        path=str(path),
        weights_sha256=card.weights_sha256,
    )


_READ_ERRORS = (InvalidDicomError, EOFError, OSError, ValueError, KeyError, struct.error)


def _image_point(index_xy: np.ndarray, width: int, height: int) -> tuple[float, float]:
    """ccfnet_core's pixel-index point -> DICOM image coordinates (index + 0.5), kept inside the image."""
    column, row = (float(v) + 0.5 for v in index_xy)
    return min(max(column, 0.0), float(width)), min(max(row, 0.0), float(height))


def _read_headers(paths: Sequence[Path]) -> tuple[dict[str, list[Dataset]], list[str]]:
    """Every readable file's header grouped by series, and a note for each file that could not be read."""
    series: dict[str, list[Dataset]] = {}
    skipped: list[str] = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except _READ_ERRORS as exc:
            skipped.append(f"{path.name}: {type(exc).__name__}: {exc}"[:300])
            continue
        series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    return series, skipped


def _stated_share(shares: np.ndarray | None, index: int, stated: str) -> float | None:
    """The stated grade's share among the abnormal grades, where a grade (not normal, not "abnormal") is stated."""
    if shares is None or stated in ("v1", "abnormal") or not np.isfinite(shares[index]):
        return None
    return float(shares[index])


def analyse_files(
    paths: Sequence[Path], model_path: Path, device: str = "auto", with_heatmaps: bool = False
) -> StudyAnalysis:
    """Choose the series and slice from the files' headers, run CCF-Net with flip TTA, return the findings.

    A file that cannot be read is left out of the choice (a broken localizer must not sink the study); the
    job fails only when nothing is readable or a chosen slice is not. The anatomy gate (ccfnet_core.anatomy_gate)
    reads the chosen series' headers before the model runs and the model's points after it. Raises
    NoEligibleInput, NotLumbarSpine, UnreadableInput, ModelUnavailable or ModelOutOfMemory.
    """
    import torch

    from ccfnet_core.anatomy_gate import HeaderEvidence, PointEvidence, check_headers, check_points, foot_direction
    from ccfnet_core.datasets import mean_intensity_from_files
    from ccfnet_core.inference import Predictor
    from ccfnet_core.series_selection import (
        NoEligibleSeries,
        choose_slice,
        image_orientation,
        load_input_slices,
    )
    from ccfnet_core.structures import STRUCTURES, grade_word, label_name, structure_type

    if not paths:
        raise NoEligibleInput("the study has no stored instances")
    series, skipped = _read_headers(paths)
    if not series:
        raise UnreadableInput(f"none of the {len(paths)} stored files is readable DICOM ({skipped[0]})")
    try:
        choice = choose_slice(series, mean_intensity=mean_intensity_from_files)
    except NoEligibleSeries as exc:
        reason = exc.reason
        if skipped:
            reason += f" ({len(skipped)} unreadable file(s) left out)"
        raise NoEligibleInput(reason) from exc
    except _READ_ERRORS as exc:
        raise UnreadableInput(f"reading pixels to rank the series: {exc}") from exc
    by_uid = {str(ds.get("SOPInstanceUID", "")): ds for ds in series[choice.series_uid]}
    looked_at = by_uid[choice.centre_sop_instance_uid]
    plane = next(s.plane for s in choice.summaries if s.series_uid == choice.series_uid)
    verdict = check_headers(HeaderEvidence.from_datasets(series[choice.series_uid], plane))
    if verdict.rule is not None:
        raise NotLumbarSpine(
            verdict.rule.value, verdict.reason, series_uid=choice.series_uid, source=looked_at,
            model=load_model(model_path, device),
        )
    full: dict[str, Dataset] = {}
    try:
        for uid in dict.fromkeys(choice.sop_instance_uids):
            full[uid] = pydicom.dcmread(by_uid[uid].filename)
        image, spacing = load_input_slices([full[uid] for uid in choice.sop_instance_uids], choice.frame_numbers)
    except _READ_ERRORS as exc:
        raise UnreadableInput(f"a chosen slice of series {choice.series_uid}: {exc}") from exc

    identity = load_model(model_path, device)
    predictor = _predictor(model_path, device)
    assert isinstance(predictor, Predictor)
    started = time.perf_counter()
    try:
        prediction = predictor.predict([image])[0]
        heatmaps = predictor.heatmaps(image) if with_heatmaps else None
    except torch.cuda.OutOfMemoryError as exc:
        raise ModelOutOfMemory(str(exc)) from exc
    seconds = time.perf_counter() - started
    centre = full[choice.centre_sop_instance_uid]
    foot = foot_direction(image_orientation(centre, choice.frame_numbers[1])) or (0.0, 1.0)
    verdict = check_points(PointEvidence(prediction.points, prediction.confidences, spacing, foot))
    if verdict.rule is not None:
        raise NotLumbarSpine(
            verdict.rule.value, verdict.reason, series_uid=choice.series_uid, source=looked_at, model=identity,
            measurements=verdict.measurements,
        )
    height, width = image.shape[-2:]
    structures = []
    for k, name in enumerate(STRUCTURES):
        label = prediction.labels[k]  # the Predictor reads every prediction through the card's readout
        stated = prediction.grades[k]
        column, row = _image_point(prediction.points[k], width, height)
        structures.append(
            StructureResult(
                name=name,
                kind=structure_type(k).value,
                column=column,
                row=row,
                label=label,
                diagnosis=label_name(k, label),
                probability=float(prediction.probabilities[k]),
                confidence=float(prediction.confidences[k]),
                grade_label=stated,
                grade=grade_word(k, stated),
                grade_share=_stated_share(prediction.grade_shares, k, stated),
                schmorl_node=bool(prediction.schmorl is not None and prediction.schmorl[k]),
            )
        )
    return StudyAnalysis(
        series_uid=choice.series_uid,
        centre_sop_instance_uid=choice.centre_sop_instance_uid,
        source=centre,
        selection_reason=choice.reason,
        structures=tuple(structures),
        heatmaps=heatmaps,
        model=identity,
        seconds=seconds,
        device=_device_label(predictor.device),
        skipped_files=tuple(skipped),
        level_warning=prediction.level_warning,
        gate={key: round(value, 3) for key, value in verdict.measurements.items()},
    )


def phantom_study(seed: int, index: int = 0) -> list[object]:
    """One synthetic lumbar MR study (pydicom Datasets: sagittal T2 + T1 + axial) for demos and benchmarks."""
    from ccfnet_core.phantom import render_study, study_generator

    datasets, _ = render_study(study_generator(seed, index), index)
    return list(datasets)


def phantom_model_path() -> Path:
    """The small phantom-trained checkpoint shipped for the demo, else the default model."""
    from ccfnet_core.checkpoint import MODELS_DIR, PHANTOM_MODEL_NAME

    candidate = MODELS_DIR / PHANTOM_MODEL_NAME
    return candidate if candidate.is_file() else default_model_path()
