"""The one module of `worker` that imports `ccfnet_core` (STYLE.md, layering).

Everything the service needs from the model library passes through here: the research commands, loading the
model once per process, and analysing one study's files into plain values the rest of the worker can use.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import typer


def register_research_commands(app: typer.Typer) -> None:
    """Mount the research commands of ccfnet_core on the service CLI."""
    from ccfnet_core.cli import register

    register(app)


class NoEligibleInput(Exception):
    """The study has no series the model can read; `reason` says what was found."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnreadableInput(Exception):
    """A spooled file could not be read as the DICOM the model needs."""


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    version: str
    software_version: str
    device_uid: str
    arch: str
    phantom_only: bool
    path: str


@dataclass(frozen=True)
class StructureResult:
    """One structure as the worker stores it. Points are DICOM image coordinates: (0, 0) is the top-left corner
    of the top-left pixel, so a pixel's centre is at index + 0.5 (ccfnet_core predicts pixel indices)."""

    name: str
    kind: str
    column: float
    row: float
    label: str
    diagnosis: str
    probability: float
    confidence: float


@dataclass(frozen=True)
class StudyAnalysis:
    series_uid: str
    centre_sop_instance_uid: str
    selection_reason: str
    structures: tuple[StructureResult, ...]
    heatmaps: np.ndarray | None
    model: ModelIdentity
    seconds: float


_models: dict[tuple[str, str], object] = {}
_models_lock = threading.Lock()


def default_model_path() -> Path:
    from ccfnet_core.checkpoint import default_model_path as core_default

    return core_default()


def _predictor(path: Path, device: str) -> object:
    """Load a checkpoint once per process and device (the worker's model cache)."""
    from ccfnet_core.inference import Predictor

    key = (str(path.resolve()), device)
    with _models_lock:
        if key not in _models:
            _models[key] = Predictor.from_checkpoint(path, device)
        return _models[key]


def model_identity(path: Path, device: str = "auto") -> ModelIdentity:
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
    )


def analyse_files(
    paths: Sequence[Path], model_path: Path, device: str = "auto", with_heatmaps: bool = False
) -> StudyAnalysis:
    """Choose the series and slice from the files' headers, run CCF-Net with flip TTA, return the findings."""
    import time

    from ccfnet_core.checkpoint import CheckpointError
    from ccfnet_core.datasets import read_dicom_files
    from ccfnet_core.inference import Predictor
    from ccfnet_core.series_selection import NoEligibleSeries
    from ccfnet_core.structures import STRUCTURES, label_name, predicted_label, structure_type

    try:
        sample = read_dicom_files(list(paths))
    except NoEligibleSeries as exc:
        raise NoEligibleInput(exc.reason) from exc
    except (ValueError, FileNotFoundError) as exc:
        raise UnreadableInput(str(exc)) from exc
    try:
        predictor = _predictor(model_path, device)
    except CheckpointError as exc:
        raise UnreadableInput(f"model: {exc}") from exc
    assert isinstance(predictor, Predictor)
    started = time.perf_counter()
    prediction = predictor.predict([sample.image])[0]
    heatmaps = predictor.heatmaps(sample.image) if with_heatmaps else None
    seconds = time.perf_counter() - started
    structures = []
    for k, name in enumerate(STRUCTURES):
        probability = float(prediction.probabilities[k])
        label = predicted_label(k, probability)
        column, row = (float(v) + 0.5 for v in prediction.points[k])
        column = min(max(column, 0.0), float(sample.width))
        row = min(max(row, 0.0), float(sample.height))
        structures.append(
            StructureResult(
                name=name,
                kind=structure_type(k).value,
                column=column,
                row=row,
                label=label,
                diagnosis=label_name(k, label),
                probability=probability,
                confidence=float(prediction.confidences[k]),
            )
        )
    return StudyAnalysis(
        series_uid=sample.meta["series_uid"],
        centre_sop_instance_uid=sample.meta["sop_instance_uid"],
        selection_reason=sample.meta["reason"],
        structures=tuple(structures),
        heatmaps=heatmaps,
        model=model_identity(model_path, device),
        seconds=seconds,
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
