"""The writers' input contract refuses what would make a wrong or invalid DICOM object, naming the field."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from results_fixtures import make_algorithm, make_findings, make_heatmaps, make_source

from worker.results import STRUCTURES, AlgorithmIdentity, AnalysisResult, StructureFinding


def _finding(**changes: Any) -> StructureFinding:
    base: dict[str, Any] = {
        "name": "L4-L5",
        "kind": "disc",
        "point_px": (120.0, 196.0),
        "label": "v3",
        "probability": 0.87,
        "confidence": 0.9,
    }
    base.update(changes)
    return StructureFinding(**base)


def test_a_valid_finding_keeps_its_values_and_describes_itself() -> None:
    finding = _finding(point_px=[120, 196])
    assert finding.point_px == (120.0, 196.0)
    assert finding.diagnosis == "protrusion"
    assert finding.text == "L4-L5 disc: protrusion, 87 %"
    assert finding.short_text == "L4-L5 protrusion 87 %"


@pytest.mark.parametrize(
    ("changes", "field", "error"),
    [
        ({"name": "L6"}, "structure name", ValueError),
        ({"kind": "vertebra"}, "kind", ValueError),
        ({"name": "L4", "kind": "vertebra", "label": "v3"}, "label", ValueError),
        ({"label": "v9"}, "label", ValueError),
        ({"probability": 1.5}, "probability", ValueError),
        ({"probability": float("nan")}, "probability", ValueError),
        ({"probability": "0.5"}, "probability", TypeError),
        ({"confidence": -0.1}, "confidence", ValueError),
        ({"point_px": (1.0,)}, "point_px", ValueError),
        ({"point_px": (float("inf"), 3.0)}, "point_px", ValueError),
        ({"point_px": ("1", 2)}, "point_px", TypeError),
    ],
)
def test_a_bad_finding_is_refused_naming_the_field(
    changes: dict[str, Any], field: str, error: type[Exception]
) -> None:
    with pytest.raises(error, match=field):
        _finding(**changes)


def test_findings_are_stored_in_canonical_order_whatever_order_they_came_in() -> None:
    findings = make_findings()
    result = AnalysisResult(make_source(), list(reversed(findings)), make_algorithm())
    assert tuple(f.name for f in result.findings) == STRUCTURES


def _result(**changes: Any) -> AnalysisResult:
    findings = make_findings()
    base: dict[str, Any] = {
        "source_dataset": make_source(),
        "findings": findings,
        "algorithm": make_algorithm(),
        "heatmaps": make_heatmaps(findings),
    }
    base.update(changes)
    return AnalysisResult(**base)


def test_all_eleven_structures_are_required_once() -> None:
    findings = make_findings()
    with pytest.raises(ValueError, match="findings lacks L5-S1"):
        _result(findings=findings[:-1])
    with pytest.raises(ValueError, match="findings has L1 twice"):
        _result(findings=[*findings, findings[0]])
    with pytest.raises(TypeError, match="findings"):
        _result(findings="L1")


def test_a_point_outside_the_source_image_is_refused() -> None:
    findings = make_findings()
    findings[3] = dataclasses.replace(findings[3], point_px=(300.0, 10.0))
    with pytest.raises(ValueError, match="point_px of L4"):
        _result(findings=findings)


@pytest.mark.parametrize(
    ("heatmaps", "error"),
    [
        (np.zeros((10, 32, 32), dtype=np.float32), ValueError),
        (np.zeros((11, 32), dtype=np.float32), ValueError),
        (np.full((11, 32, 32), 1.2, dtype=np.float32), ValueError),
        (np.full((11, 32, 32), np.nan, dtype=np.float32), ValueError),
        (np.zeros((11, 32, 32), dtype=np.uint8), TypeError),
        ([[0.0]], TypeError),
    ],
)
def test_bad_heatmaps_are_refused(heatmaps: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="heatmaps"):
        _result(heatmaps=heatmaps)


def test_a_source_that_is_not_one_grayscale_slice_is_refused() -> None:
    no_pixels = make_source()
    del no_pixels.PixelData
    with pytest.raises(ValueError, match="source_dataset lacks PixelData"):
        _result(source_dataset=no_pixels)
    multiframe = make_source()
    multiframe.NumberOfFrames = 3
    with pytest.raises(ValueError, match="source_dataset must be a single-frame"):
        _result(source_dataset=multiframe)
    color = make_source()
    color.SamplesPerPixel = 3
    with pytest.raises(ValueError, match="source_dataset must be a grayscale"):
        _result(source_dataset=color)
    with pytest.raises(TypeError, match="source_dataset"):
        _result(source_dataset={"PatientID": "x"})


@pytest.mark.parametrize(
    ("changes", "field", "error"),
    [
        ({"device_uid": "1.2.03"}, "device_uid", ValueError),
        ({"device_uid": "1." + "2" * 70}, "device_uid", ValueError),
        ({"model_name": ""}, "model_name", ValueError),
        ({"manufacturer": "a\\b"}, "manufacturer", ValueError),
        ({"software_version": 1}, "software_version", TypeError),
        ({"phantom_only": "no"}, "phantom_only", TypeError),
    ],
)
def test_a_bad_algorithm_identity_is_refused(
    changes: dict[str, Any], field: str, error: type[Exception]
) -> None:
    base = dataclasses.asdict(make_algorithm())
    base.update(changes)
    with pytest.raises(error, match=field):
        AlgorithmIdentity(**base)


def test_a_normal_finding_states_the_probability_of_normal() -> None:
    finding = _finding(label="v1", probability=0.12)
    assert finding.text == "L4-L5 disc: normal, 88 %"
