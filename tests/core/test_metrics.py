"""Paper and challenge metrics on hand-made cases whose answers are worked out in the comments."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ccfnet_core.metrics import challenge_metrics, confusion_matrices, miss_breakdown, paper_metrics, roc_auc
from ccfnet_core.sample import Prediction, SliceSample
from ccfnet_core.structures import NUM_STRUCTURES, STRUCTURES

# Top to bottom along the spine, 20 px apart: no two ground-truth points are within 6 mm at spacing >= 0.5.
SPINE_ORDER = ("T12-L1", "L1", "L1-L2", "L2", "L2-L3", "L3", "L3-L4", "L4", "L4-L5", "L5", "L5-S1")


def gt_points() -> np.ndarray:
    points = np.zeros((NUM_STRUCTURES, 2))
    for position, name in enumerate(SPINE_ORDER):
        points[STRUCTURES.index(name)] = (100.0, 20.0 + 20.0 * position)
    return points


def make_sample(
    labels: dict[str, str],
    spacing: tuple[float, float] = (1.0, 1.0),
    missing: tuple[str, ...] = (),
    study_id: str = "s",
    flag: str | None = None,
) -> SliceSample:
    points = gt_points()
    for name in missing:
        points[STRUCTURES.index(name)] = np.nan
    label_sets = tuple(
        frozenset(labels[name].split(",")) if name in labels and name not in missing else frozenset()
        for name in STRUCTURES
    )
    return SliceSample(
        study_id=study_id,
        image=np.zeros((3, 8, 8), dtype=np.float32),
        points=points,
        labels=label_sets,
        spacing_mm=spacing,
        flag=flag,
    )


def make_prediction(
    probabilities: dict[str, float], moves: dict[str, tuple[float, float]] | None = None
) -> Prediction:
    """Predictions on the ground truth except `moves` (name -> new (x, y)); unlisted probabilities 0.5."""
    points = gt_points()
    for name, xy in (moves or {}).items():
        points[STRUCTURES.index(name)] = xy
    probs = np.array([probabilities.get(name, 0.5) for name in STRUCTURES])
    return Prediction(points=points, probabilities=probs, confidences=np.ones(NUM_STRUCTURES))


def at(name: str, dx: float = 0.0, dy: float = 0.0) -> tuple[float, float]:
    x, y = gt_points()[STRUCTURES.index(name)]
    return float(x + dx), float(y + dy)


STUDY_A = {
    "L1": "v1", "L2": "v2", "L3": "v1", "L4": "v2", "L5": "v2",
    "T12-L1": "v1", "L1-L2": "v2", "L2-L3": "v3", "L3-L4": "v1", "L4-L5": "v4", "L5-S1": "v2,v5",
}  # fmt: skip
PROBS_A = {
    "L1": 0.2, "L2": 0.9, "L3": 0.7, "L4": 0.9, "L5": 0.1,
    "T12-L1": 0.1, "L1-L2": 0.8, "L2-L3": 0.8, "L3-L4": 0.2, "L4-L5": 0.3, "L5-S1": 0.9,
}  # fmt: skip
STUDY_B = {name: "v1" for name in STRUCTURES} | {"L5-S1": "v5"}


def two_studies() -> tuple[list[SliceSample], list[Prediction]]:
    """A: every point in place, some classes wrong. B (0.5 mm pixels, T12-L1 not annotated): L1 moved 7 mm,
    L3 and L4 predictions swapped, every probability 0.1 (all predicted v1)."""
    a = make_sample(STUDY_A, study_id="A")
    b = make_sample(STUDY_B, spacing=(0.5, 0.5), missing=("T12-L1",), study_id="B")
    pred_a = make_prediction(PROBS_A)
    pred_b = make_prediction(
        dict.fromkeys(STRUCTURES, 0.1), {"L1": at("L1", dx=14.0), "L3": at("L4"), "L4": at("L3")}
    )
    return [a, b], [pred_a, pred_b]


def test_perfect_prediction_scores_100() -> None:
    sample = make_sample(STUDY_A)
    targets = sample.abnormal_targets()
    probs = {name: (0.5 if np.isnan(t) else float(t)) for name, t in zip(STRUCTURES, targets, strict=True)}
    result = paper_metrics([sample], [make_prediction(probs)])
    for key in ("L-Disc", "L-Vertebra", "C-Disc", "C-Vertebra", "Score"):
        assert result[key] == pytest.approx(100.0), key
    assert result["per_type"]["disc"]["n_classified"] == 6  # L5-S1 {v2, v5} counts as abnormal
    assert result["per_structure"]["L3"]["mean_error_mm"] == 0.0
    assert result["notes"] == []


def test_localisation_uses_6_mm_with_row_and_column_spacing() -> None:
    sample = make_sample(STUDY_A, spacing=(1.0, 0.5))  # rows 1 mm, columns 0.5 mm
    moves = {
        "L1": at("L1", dx=14.0),  # 7 mm along x: not localised
        "L2": at("L2", dx=11.8),  # 5.9 mm: localised
        "L3": at("L3", dy=7.0),  # 7 mm along y: not localised
        "L4": at("L4", dy=6.0),  # exactly 6 mm: localised (<=)
        "T12-L1": (math.nan, math.nan),  # no prediction: not localised
    }
    result = paper_metrics([sample], [make_prediction(PROBS_A, moves)])
    assert result["L-Vertebra"] == pytest.approx(60.0)
    assert result["L-Disc"] == pytest.approx(500.0 / 6.0)
    detail = result["per_structure"]
    assert detail["L1"]["localisation_rate"] == 0.0 and detail["L2"]["localisation_rate"] == 100.0
    assert detail["L1"]["mean_error_mm"] == pytest.approx(7.0)
    assert detail["L3"]["median_error_mm"] == pytest.approx(7.0)
    assert detail["L4"]["mean_error_mm"] == pytest.approx(6.0)
    assert math.isnan(detail["T12-L1"]["mean_error_mm"])
    assert any("no (finite) prediction" in note for note in result["notes"])


def test_paper_metrics_on_two_studies_by_hand() -> None:
    samples, predictions = two_studies()
    result = paper_metrics(samples, predictions)
    # Vertebrae: A 5/5 localised; B only L2 and L5 (L1 is 7 mm off, L3/L4 are 20 mm off their own points).
    assert result["L-Vertebra"] == pytest.approx(70.0)
    assert result["L-Disc"] == pytest.approx(100.0)  # 11/11 (B's T12-L1 is not annotated)
    # Disc AUC: abnormal 0.8, 0.8, 0.3, 0.9 all above normal 0.1, 0.2, 0.1 x 4 (B's v5 disc has no target).
    assert result["C-Disc"] == pytest.approx(100.0)
    # Vertebra AUC: abnormal 0.9, 0.9, 0.1 vs normal 0.2, 0.7, 0.1, 0.1: 4 + 4 + (0.5 + 0.5) = 9 of 12.
    assert result["C-Vertebra"] == pytest.approx(75.0)
    assert result["Score"] == pytest.approx(85.0 * 87.5 / 100.0)  # 74.375
    assert result["per_type"]["vertebra"] == {
        "n_points": 10,
        "n_localised": 7,
        "n_classified": 7,
        "n_abnormal": 3,
        "localisation_rate": pytest.approx(70.0),
        "auc": pytest.approx(75.0),
    }


def test_points_not_localised_are_left_out_of_the_auc() -> None:
    sample = make_sample(STUDY_A)
    # L3 (normal) gets the highest score, which would spoil the AUC, but it is 10 mm away.
    probs = PROBS_A | {"L3": 0.99, "L5": 0.95}
    result = paper_metrics([sample], [make_prediction(probs, {"L3": at("L3", dx=10.0)})])
    assert result["C-Vertebra"] == pytest.approx(100.0)
    assert result["per_type"]["vertebra"]["n_classified"] == 4
    moved_back = paper_metrics([sample], [make_prediction(probs)])
    # Normal 0.2 and 0.99 vs abnormal 0.9, 0.9, 0.95: each abnormal beats one normal of two.
    assert moved_back["C-Vertebra"] == pytest.approx(50.0)


def test_one_class_auc_is_nan_with_a_note() -> None:
    labels = STUDY_A | {name: "v1" for name in ("L1", "L2", "L3", "L4", "L5")}
    result = paper_metrics([make_sample(labels)], [make_prediction(PROBS_A)])
    assert math.isnan(result["C-Vertebra"]) and math.isnan(result["Score"])
    assert not math.isnan(result["C-Disc"])
    assert any(note.startswith("C-Vertebra undefined") for note in result["notes"])
    assert any("Score undefined" in note for note in result["notes"])


@pytest.mark.parametrize("seed", range(5))
def test_auc_with_ties_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 2, size=60).astype(float)
    targets[:2] = (0.0, 1.0)
    scores = np.round(rng.random(60) * 4) / 4  # five distinct values: many ties
    assert roc_auc(targets, scores) == pytest.approx(roc_auc_score(targets, scores))


def test_auc_edge_cases() -> None:
    assert roc_auc(np.array([0.0, 1.0]), np.array([0.3, 0.3])) == 0.5
    assert roc_auc(np.array([1.0, 0.0]), np.array([0.1, 0.9])) == 0.0
    assert math.isnan(roc_auc(np.array([1.0, 1.0]), np.array([0.1, 0.9])))
    with pytest.raises(ValueError, match="0 or 1"):
        roc_auc(np.array([2.0, 0.0]), np.array([0.1, 0.9]))


def test_challenge_counts_on_two_studies_by_hand() -> None:
    samples, predictions = two_studies()
    result = challenge_metrics(samples, predictions)
    counts = {key: (row["tp"], row["fp"], row["fn"]) for key, row in result["per_class"].items()}
    assert counts == {
        # A: L1 TP; L5 predicted v1 (FP), L3 v1 missed (FN). B: L2, L5 and the swapped L3/L4 TP (names
        # need not agree); L1 7 mm away is FP and its ground truth FN.
        "vertebra_v1": (5, 2, 2),
        # A: L2, L4 TP; L3 predicted v2 is FP; L5 v2 missed.
        "vertebra_v2": (2, 1, 1),
        # A: T12-L1, L3-L4 TP; L4-L5 predicted v1 FP. B: 4 TP; T12-L1 (no ground truth) and L5-S1 (v5) FP.
        "disc_v1": (6, 3, 0),
        # A: L1-L2 TP, L5-S1 {v2, v5} TP through v2; L2-L3 (v3) predicted v2 is FP.
        "disc_v2": (2, 1, 0),
        "disc_v3": (0, 0, 1),
        "disc_v4": (0, 0, 1),
        "disc_v5": (0, 0, 1),  # B's v5-only disc; A's {v2, v5} disc was matched, so no FN for it
    }
    assert result["totals"] == {"tp": 15, "fp": 7, "fn": 6}
    f1 = {key: row["f1"] for key, row in result["per_class"].items()}
    assert f1["vertebra_v1"] == pytest.approx(10 / 14)
    assert f1["disc_v3"] == 0.0
    assert result["per_class"]["vertebra_v2"]["precision"] == pytest.approx(2 / 3)
    assert result["per_class"]["vertebra_v2"]["recall"] == pytest.approx(2 / 3)
    assert math.isnan(result["per_class"]["disc_v3"]["precision"])
    assert result["macro_f1"] == pytest.approx((10 / 14 + 4 / 6 + 12 / 15 + 4 / 5) / 7)


def test_challenge_counts_one_tp_per_ground_truth_point() -> None:
    sample = make_sample(STUDY_B)
    # L2's prediction sits on L1 too: only one of the two predictions can be L1's TP; L2 is an FN.
    result = challenge_metrics([sample], [make_prediction(dict.fromkeys(STRUCTURES, 0.1), {"L2": at("L1")})])
    assert (result["per_class"]["vertebra_v1"]["tp"], result["per_class"]["vertebra_v1"]["fp"]) == (4, 1)
    assert result["per_class"]["vertebra_v1"]["fn"] == 1
    strict = challenge_metrics([sample], [make_prediction(dict.fromkeys(STRUCTURES, 0.1))], threshold=0.05)
    assert strict["per_class"]["vertebra_v2"]["fp"] == 5  # every vertebra now predicted v2
    assert strict["per_class"]["vertebra_v1"]["fn"] == 5


def test_missed_two_label_disc_is_a_false_negative_of_both_labels() -> None:
    sample = make_sample(STUDY_A)
    result = challenge_metrics([sample], [make_prediction(PROBS_A | {"L5-S1": 0.1})])  # predicted v1
    rows = result["per_class"]
    assert (rows["disc_v2"]["fn"], rows["disc_v5"]["fn"]) == (1, 1)
    assert (rows["disc_v2"]["tp"], rows["disc_v1"]["fp"]) == (1, 2)  # L1-L2 TP; L4-L5 and L5-S1 FP


def test_confusion_matrices_over_localised_points() -> None:
    samples, predictions = two_studies()
    result = confusion_matrices(samples, predictions)
    assert result["vertebra"]["true"] == ["v1", "v2"] and result["vertebra"]["predicted"] == ["v1", "v2"]
    # A: v1 -> (L1 v1, L3 v2); v2 -> (L2 v2, L4 v2, L5 v1). B: L2 and L5 localised, both v1 -> v1.
    assert result["vertebra"]["matrix"] == [[3, 1], [1, 2]]
    assert result["disc"]["predicted"] == ["v1", "v2", "v3", "v4", "v5"]
    # Rows v1..v5; A's L5-S1 {v2, v5} predicted abnormal counts in both v2 and v5 rows. Without a readout the
    # binary rule predicts v1 or v2 only, and the grade a person reads is "abnormal".
    assert result["disc"]["matrix"] == [
        [6, 0, 0, 0, 0], [0, 2, 0, 0, 0], [0, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]
    ]
    assert result["disc_stated"]["matrix"] == [[6, 0, 0, 0, 0], [0, 0, 0, 0, 2], [0, 0, 0, 0, 1], [1, 0, 0, 0, 0],
                                               [1, 0, 0, 0, 1]]


def test_a_readouts_labels_replace_the_binary_rule() -> None:
    samples, predictions = two_studies()
    labels = ["v1"] * 11
    labels[STRUCTURES.index("L2-L3")] = "v3"  # truly v3: a TP of v3 now, no longer a TP of v2
    graded = replace(predictions[0], labels=tuple(labels), grades=tuple(labels))
    result = confusion_matrices(samples[:1], [graded])
    assert result["disc"]["matrix"][2] == [0, 0, 1, 0, 0]
    assert challenge_metrics(samples[:1], [graded])["per_class"]["disc_v3"]["tp"] == 1


def assert_plain(value: object) -> None:
    """Only JSON's own types (no numpy scalars, tuples or frozensets) anywhere in a result."""
    if isinstance(value, dict):
        assert all(isinstance(key, str) for key in value)
        for item in value.values():
            assert_plain(item)
    elif isinstance(value, list):
        for item in value:
            assert_plain(item)
    else:
        assert type(value) in (str, int, float, bool, type(None)), (value, type(value))


def test_outputs_are_json_serialisable_and_inputs_checked() -> None:
    samples, predictions = two_studies()
    samples[1] = make_sample(STUDY_B, spacing=(0.5, 0.5), study_id="B", flag="suspect")
    for result in (
        paper_metrics(samples, predictions),
        challenge_metrics(samples, predictions),
        confusion_matrices(samples, predictions),
    ):
        assert_plain(result)
        json.dumps(result)
    assert any("1 flagged samples included (B)" in n for n in paper_metrics(samples, predictions)["notes"])
    with pytest.raises(ValueError, match="2 samples but 1 predictions"):
        paper_metrics(samples, predictions[:1])
    with pytest.raises(ValueError, match="radius_mm"):
        challenge_metrics(samples, predictions, radius_mm=0.0)


def test_miss_breakdown_tells_duplicates_from_level_shifts_and_stray_points() -> None:
    """L1 on L2 (L2 found too: duplicate), L3 and L4 swapped (both level shifts), the T12-L1 disc on the L1
    vertebra (other type), L5 30 mm aside (off target), L5-S1 not predicted; the rest in place."""
    sample = make_sample(STUDY_A)
    prediction = make_prediction({}, moves={
        "L1": at("L2"), "L3": at("L4"), "L4": at("L3"), "T12-L1": at("L1", dy=1.0), "L5": at("L5", dx=30.0),
        "L5-S1": (math.nan, math.nan),
    })
    counts = miss_breakdown([sample], [prediction])
    assert counts == {"duplicate": 1, "level_shift": 2, "other_type": 1, "off_target": 1, "no_prediction": 1}
    per_type = paper_metrics([sample], [prediction])["per_type"]
    assert sum(counts.values()) == NUM_STRUCTURES - per_type["disc"]["n_localised"] - per_type["vertebra"][
        "n_localised"]  # every miss has exactly one kind
