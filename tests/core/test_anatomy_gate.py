"""The anatomy gate's rules, each on evidence it must refuse and on evidence it must pass; real lumbar slices pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from ccfnet_core.anatomy_gate import (
    CHAIN,
    GateRule,
    GateThresholds,
    HeaderEvidence,
    PointEvidence,
    assess,
    check_headers,
    check_points,
    foot_direction,
    kendall_tau,
    measure,
)
from ccfnet_core.structures import STRUCTURES

ROOT = Path(__file__).resolve().parents[2]
TIANCHI = ROOT.parent / "shared" / "data" / "tianchi-slices"
LUMBAR = HeaderEvidence(modality="MR", body_part="LSPINE", descriptions=("T2_TSE_SAG",), plane="sagittal")


def spine(spacing_mm: float = 0.75, half_level_mm: float = 18.0, top_row: float = 60.0) -> np.ndarray:
    """(11, 2) pixel points of a lordotic lumbar spine, head at the top, in STRUCTURES order."""
    points = np.zeros((len(STRUCTURES), 2))
    for position, channel in enumerate(CHAIN):
        row = top_row + position * half_level_mm / spacing_mm
        points[channel] = (180.0 + 12.0 * np.sin(position / 10 * np.pi), row)
    return points


def evidence(points: np.ndarray, confidence: float = 0.8, spacing: float = 0.75,
             foot: tuple[float, float] = (0.0, 1.0)) -> PointEvidence:
    return PointEvidence(points, np.full(len(STRUCTURES), confidence), (spacing, spacing), foot)


def test_lumbar_headers_and_silent_headers_pass() -> None:
    assert check_headers(LUMBAR).passed
    silent = HeaderEvidence(modality="", body_part="", descriptions=(), plane="sagittal")
    assert check_headers(silent).passed
    unknown_word = HeaderEvidence(modality="MR", body_part="MRI", descriptions=("t2_tse_sag_384",), plane="sagittal")
    assert check_headers(unknown_word).passed


@pytest.mark.parametrize(
    ("headers", "rule", "words"),
    [
        (HeaderEvidence("CT", "LSPINE", (), "sagittal"), GateRule.MODALITY, "modality is CT"),
        (HeaderEvidence("MR", "HEAD", (), "sagittal"), GateRule.BODY_PART, "HEAD"),
        (HeaderEvidence("MR", "C-SPINE", (), "sagittal"), GateRule.BODY_PART, "C-SPINE"),
        (HeaderEvidence("MR", "", ("MRI BRAIN W/O",), "sagittal"), GateRule.DESCRIPTION, "brain"),
        (HeaderEvidence("MR", "", ("T1W/SE", "SHOULDER"), "sagittal"), GateRule.DESCRIPTION, "shoulder"),
        (HeaderEvidence("MR", "LSPINE", ("T2 TRA",), "axial"), GateRule.PLANE, "axial"),
        (HeaderEvidence("MR", "LSPINE", ("T2 COR",), "coronal"), GateRule.PLANE, "coronal"),
    ],
)
def test_each_header_rule_refuses_what_it_should(headers: HeaderEvidence, rule: GateRule, words: str) -> None:
    verdict = check_headers(headers)
    assert verdict.rule is rule and not verdict.passed
    assert words in verdict.reason


def test_a_description_naming_the_lumbar_spine_too_is_not_refused() -> None:
    combined = HeaderEvidence("MR", "", ("MR BRAIN AND L-SPINE",), "sagittal")
    assert check_headers(combined).passed


def test_headers_are_read_from_the_series_datasets() -> None:
    ds = Dataset()
    ds.Modality, ds.BodyPartExamined, ds.StudyDescription = "MR", "KNEE", "MR KNEE"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    headers = HeaderEvidence.from_datasets([ds])
    assert (headers.plane, headers.body_part, headers.descriptions) == ("coronal", "KNEE", ("MR KNEE",))
    assert HeaderEvidence.from_datasets([ds], plane="sagittal").plane == "sagittal"
    with pytest.raises(ValueError, match="at least one dataset"):
        HeaderEvidence.from_datasets([])


def test_a_lumbar_chain_passes_and_one_misplaced_level_is_tolerated() -> None:
    assert check_points(evidence(spine())).passed
    misplaced = spine()
    misplaced[STRUCTURES.index("T12-L1")] = misplaced[STRUCTURES.index("L1-L2")]  # a real model's slip
    verdict = check_points(evidence(misplaced))
    assert verdict.passed, verdict.reason
    assert verdict.measurements["order_tau"] < 1.0


def test_points_out_of_the_spines_order_are_refused() -> None:
    shuffled = spine()[np.random.default_rng(1).permutation(len(STRUCTURES))]
    verdict = check_points(evidence(shuffled))
    assert verdict.rule is GateRule.ORDER and "head to foot" in verdict.reason


def test_the_head_foot_direction_comes_from_the_orientation() -> None:
    assert foot_direction([0, 1, 0, 0, 0, -1]) == (0.0, 1.0)  # the usual display: feet down the rows
    assert foot_direction([0, 1, 0, 0, 0, 1]) == (0.0, -1.0)  # head at the bottom
    assert foot_direction([0, 0, -1, 0, 1, 0]) == (1.0, 0.0)  # feet along the rows
    assert foot_direction([1, 0, 0, 0, 1, 0]) is None  # axial: no head-foot axis in the plane
    assert foot_direction(None) is None
    # A spine drawn head-down is in order only when the orientation says the head is at the bottom.
    upside_down = spine() * np.array([1.0, -1.0]) + np.array([0.0, 600.0])
    assert check_points(evidence(upside_down, foot=(0.0, -1.0))).passed
    assert check_points(evidence(upside_down)).rule is GateRule.ORDER


@pytest.mark.parametrize("half_level_mm", [5.0, 40.0])
def test_levels_too_close_or_too_far_apart_are_refused(half_level_mm: float) -> None:
    verdict = check_points(evidence(spine(half_level_mm=half_level_mm)))
    assert verdict.rule is GateRule.SPACING and "outside the 10 to 30 mm" in verdict.reason
    assert verdict.measurements["median_step_mm"] == pytest.approx(half_level_mm, rel=0.1)


def test_the_spacing_is_measured_in_millimetres_from_the_pixel_spacing() -> None:
    points = spine(spacing_mm=0.75)  # 18 mm half-levels at 0.75 mm per pixel
    assert measure(evidence(points, spacing=0.75))["median_step_mm"] == pytest.approx(18.0, rel=0.05)
    assert check_points(evidence(points, spacing=0.2)).rule is GateRule.SPACING  # a 4.8 mm "spine"


def test_unconfident_peaks_are_refused() -> None:
    verdict = check_points(evidence(spine(), confidence=0.05))
    assert verdict.rule is GateRule.CONFIDENCE and "not sure" in verdict.reason
    assert check_points(evidence(spine(), confidence=0.05), GateThresholds(min_confidence=0.01)).passed


def test_assess_returns_the_first_refusal_and_names_both_checks_on_a_pass() -> None:
    axial = HeaderEvidence("MR", "LSPINE", (), "axial")
    assert assess(axial, evidence(spine(), confidence=0.01)).rule is GateRule.PLANE
    passed = assess(LUMBAR, evidence(spine()))
    assert passed.passed and "headers" in passed.reason and "points" in passed.reason


def test_evidence_and_thresholds_are_checked_when_made() -> None:
    with pytest.raises(ValueError, match="points"):
        PointEvidence(np.zeros((10, 2)), np.zeros(11), (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        PointEvidence(spine(), np.zeros(11), (0.0, 1.0))
    with pytest.raises(ValueError, match="unit vector"):
        PointEvidence(spine(), np.zeros(11), (1.0, 1.0), (0.0, 2.0))
    with pytest.raises(ValueError, match="step_mm"):
        GateThresholds(step_mm=(30.0, 10.0))


def test_kendall_tau() -> None:
    assert kendall_tau(np.arange(11.0)) == 1.0
    assert kendall_tau(-np.arange(11.0)) == -1.0
    assert kendall_tau(np.array([1.0, 0.0, 2.0])) == pytest.approx(1 / 3)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 160 slices through the full default model on a CPU
@pytest.mark.skipif(not TIANCHI.is_dir(), reason=f"research slices not present at {TIANCHI}")
def test_every_real_lumbar_slice_passes_with_the_shipped_model() -> None:
    """The 160 tianchi slices, with the default model: none refused (the gate's thresholds were read off them)."""
    from ccfnet_core.checkpoint import default_model_path
    from ccfnet_core.datasets import read_tianchi_slices
    from ccfnet_core.inference import Predictor

    samples = read_tianchi_slices(TIANCHI)
    predictions = Predictor.from_checkpoint(default_model_path(), "cpu").predict([s.image for s in samples])
    refused = {}
    for sample, prediction in zip(samples, predictions, strict=True):
        points = PointEvidence(prediction.points, prediction.confidences, sample.spacing_mm)
        verdict = assess(LUMBAR, points)
        if not verdict.passed:
            refused[sample.study_id] = verdict.reason
    assert len(samples) == 160
    assert refused == {}


@pytest.mark.parametrize(
    ("description", "passes"),
    [("SAG T2 C-SPINE", False), ("c spine sag", False), ("T2 SAG L-SPINE", True), ("WHOLE SPINE SAG", True),
     ("t2_tse_sag", True), ("SAG T2 CERVICAL", False), ("sag_c_spine_t2", False)],
)
def test_a_spine_description_counts_only_for_the_lumbar_spine(description: str, passes: bool) -> None:
    assert check_headers(HeaderEvidence("MR", "", (description,), "sagittal")).passed is passes
