"""The readout (issue 26): calibration, operating points, the disc grade rule, the level check, their intervals,
and a model that carries them in its card and reads every prediction through them."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ccfnet_core import calibration as cal
from ccfnet_core.checkpoint import load_model, read_card, write_card
from ccfnet_core.disc_grades import (
    DISC_GRADES,
    GradeRecipe,
    attach_grade_grader,
    disc_grade_target,
    disc_grade_targets,
    held_out_grade_metrics,
    train_grade_grader,
)
from ccfnet_core.evaluate import fold_checkpoint, predict_out_of_fold
from ccfnet_core.fit_readout import (
    ReadoutAims,
    choose_calibration,
    fit,
    fit_grade_posterior,
    tabulate,
    threshold_for_sensitivity,
)
from ccfnet_core.inference import Predictor
from ccfnet_core.intervals import bootstrap, interval
from ccfnet_core.levels import level_doubt, level_shifted
from ccfnet_core.metrics import roc_auc
from ccfnet_core.model import GradedCCFNet, RefinedCCFNet, create_model, with_grades_arch
from ccfnet_core.readout import (
    LEVEL_WARNING,
    GradeRule,
    LevelCheck,
    OperatingPoint,
    Readout,
    disc_reading,
    read,
)
from ccfnet_core.sample import Prediction, SliceSample
from ccfnet_core.structures import STRUCTURES, StructureType, grade_word
from tests.core.test_grader import _blob_samples, _network_checkpoint, write_slices_dataset
from tests.core.test_metrics import at, gt_points, make_prediction, make_sample
from worker.cli import app


def _calibration_data(n: int, seed: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Scores whose true P(abnormal) is sigmoid(logit / temperature): over-confident for a temperature above 1."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-logits / temperature))).astype(float)
    return 1 / (1 + np.exp(-logits)), y


def test_each_calibration_repairs_an_over_confident_score_and_keeps_its_ranking() -> None:
    p, y = _calibration_data(4000, seed=0, temperature=2.0)
    before = cal.expected_calibration_error(p, y)
    assert before > 0.05
    for method in cal.METHODS:
        fitted = cal.fit(method, p, y)
        assert cal.expected_calibration_error(fitted(p), y) < 0.03, method
        assert cal.Calibration.from_dict(json.loads(json.dumps(fitted.to_dict()))) == fitted
        assert np.all(np.diff(fitted(np.sort(p))) >= 0)  # monotone: the ranking (AUC) is kept
    temperature = cal.fit("temperature", p, y)
    assert temperature.scale == pytest.approx(0.5, abs=0.05) and temperature.bias == 0.0
    assert roc_auc(y, temperature(p)) == pytest.approx(roc_auc(y, p))
    with pytest.raises(ValueError, match="both"):
        cal.fit("platt", p, np.ones_like(p))


def test_the_simplest_calibration_within_the_tolerance_is_chosen() -> None:
    p, y = _calibration_data(2000, seed=1, temperature=2.0)
    fold = np.arange(p.size) % 4
    method, eces = choose_calibration(p, y, fold, tolerance=1.0)
    assert method == "temperature" and set(eces) == set(cal.METHODS)
    method, _ = choose_calibration(p, y, fold, tolerance=0.0)
    assert eces[method] == min(eces.values())


def test_the_operating_point_is_the_highest_threshold_that_keeps_the_sensitivity() -> None:
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    y = np.array([0, 0, 1, 0, 1, 0, 1, 1, 1, 1.0])
    threshold = threshold_for_sensitivity(p, y, 0.8)
    assert threshold == 0.5  # 5 of 6 abnormal at or above 0.5; 0.7 would keep 4 of 6
    assert ((p >= threshold) & (y == 1)).sum() / (y == 1).sum() >= 0.8


def test_bootstrap_intervals_hold_the_estimate_and_are_reproducible() -> None:
    values = np.random.default_rng(0).normal(10.0, 1.0, 200)
    estimate, low, high = bootstrap(lambda draw: float(values[draw].mean()), values.size)
    assert low < estimate < high and high - low == pytest.approx(4 * 1.96 / math.sqrt(200) / 2, rel=0.25)
    assert bootstrap(lambda draw: float(values[draw].mean()), values.size) == (estimate, low, high)
    assert math.isnan(interval([math.nan, math.nan])[0])


def test_the_grade_target_puts_the_herniation_grade_before_the_node() -> None:
    assert disc_grade_target(frozenset({"v2", "v5"})) == DISC_GRADES.index("v2")
    assert disc_grade_target(frozenset({"v5"})) == DISC_GRADES.index("v5")
    assert disc_grade_target(frozenset()) == -1
    sample = make_sample({"L4-L5": "v3", "L5-S1": "v4"}, missing=("T12-L1",))
    assert list(disc_grade_targets(sample)) == [-1, -1, -1, -1, 2, 3]


RULE = GradeRule(min_share=0.6, schmorl_threshold=0.5)  # the default posterior: q renormalised


def test_a_disc_grade_is_stated_only_where_its_share_is_enough() -> None:
    clear = np.array([0.05, 0.1, 0.8, 0.05, 0.0])  # protrusion: 0.8 / 0.95 of the abnormal grades
    unsure = np.array([0.1, 0.4, 0.45, 0.05, 0.0])
    assert disc_reading(RULE, 0.9, True, clear)[:2] == ("v3", "v3")
    label, stated, share, node = disc_reading(RULE, 0.9, True, unsure)
    assert (label, stated, node) == ("v3", "abnormal", False) and share < 0.6
    assert disc_reading(RULE, 0.1, False, clear) == ("v1", "v1", disc_reading(RULE, 0.1, False, clear)[2], False)
    nodular = np.array([0.2, 0.1, 0.1, 0.0, 0.6])
    assert disc_reading(RULE, 0.1, False, nodular)[0::3] == ("v5", True)  # the node is the challenge label
    assert disc_reading(RULE, 0.9, True, nodular)[1] != "v5"  # the stated grade is the herniation grade alone
    assert disc_reading(None, 0.9, True, None)[:2] == ("v2", "abnormal")  # no grade grader: no grade guessed
    assert grade_word(STRUCTURES.index("L4-L5"), "abnormal") == "abnormal"
    assert grade_word(STRUCTURES.index("L4-L5"), "v3") == "protrusion"


def test_the_severity_weight_moves_a_confident_abnormal_disc_towards_protrusion() -> None:
    grades = np.array([0.1, 0.45, 0.45, 0.0, 0.0])
    sloped = GradeRule(weights=((1.0, 0.0, 0.0, 0.0), (0.0, 1.0, 0.0, 1.0), (0.0, 0.0, 1.0, 0.0)))
    assert sloped.posterior(grades, 0.95).argmax() == 1
    assert sloped.posterior(grades, 0.2).argmax() == 0
    assert GradeRule.from_dict(json.loads(json.dumps(sloped.to_dict()))) == sloped
    leaning = GradeRule(label_priors=(0.0, 0.0, 3.0))  # the label leans to extrusion; the stated grade does not
    assert disc_reading(leaning, 0.9, True, np.array([0.1, 0.3, 0.5, 0.1, 0.0]))[:2] == ("v4", "v3")


def test_the_grade_posterior_is_learnt_from_the_features() -> None:
    rng = np.random.default_rng(0)
    truth = rng.choice(np.array(["v2", "v3", "v4"]), 600)
    severity = np.where(truth == "v2", -1.0, np.where(truth == "v3", 1.0, 3.0)) + rng.normal(0, 0.5, 600)
    features = np.stack([np.full(600, np.log(1 / 3))] * 3 + [severity], axis=1)  # q says nothing; P(abnormal) does
    rule = fit_grade_posterior(features, truth)
    q = np.tile([0.0, 1 / 3, 1 / 3, 1 / 3, 0.0], (600, 1))
    chosen = np.array(["v2", "v3", "v4"])[rule.posterior(q, 1 / (1 + np.exp(-severity))).argmax(axis=1)]
    assert (chosen == truth).mean() > 0.85


def _readout() -> Readout:
    return Readout(
        calibration={StructureType.VERTEBRA: cal.Calibration("temperature", scale=0.5)},
        operating_points={StructureType.VERTEBRA: OperatingPoint(0.7, "test"), StructureType.DISC: OperatingPoint(0.4)},
        grade_rule=RULE,
        level_check=LevelCheck(threshold=0.3),
    )


def test_read_calibrates_uses_the_cards_thresholds_and_warns_about_the_levels() -> None:
    names = {"L1": 0.9, "L2": 0.65, "L4-L5": 0.45, "L5-S1": 0.3}
    raw = make_prediction(names)
    grades = np.full((11, 5), np.nan)
    grades[STRUCTURES.index("L4-L5")] = [0.05, 0.1, 0.8, 0.05, 0.0]
    grades[STRUCTURES.index("L5-S1")] = [0.5, 0.2, 0.2, 0.1, 0.0]
    raw = replace(raw, grade_probabilities=grades, level_doubt=0.35)
    readout = Readout.from_dict(json.loads(json.dumps(_readout().to_dict())))
    assert readout == _readout()
    read_out = read(readout, raw)
    l1, l2 = STRUCTURES.index("L1"), STRUCTURES.index("L2")
    assert read_out.probabilities[l1] == pytest.approx(1 / (1 + math.exp(-0.5 * math.log(9))))  # 0.75
    assert read_out.raw_probabilities is not None and np.array_equal(read_out.raw_probabilities, raw.probabilities)
    assert read_out.labels[l1] == "v2" and read_out.labels[l2] == "v1"  # 0.58 after calibration: under 0.7
    assert read_out.grades[STRUCTURES.index("L4-L5")] == "v3"  # 0.45 >= the disc threshold 0.4
    assert read_out.labels[STRUCTURES.index("L5-S1")] == "v1"  # 0.3: normal, whatever its grade softmax
    assert read_out.level_warning == LEVEL_WARNING
    assert read(readout, replace(raw, level_doubt=0.2)).level_warning is None
    plain = read(Readout(), raw)  # no readout: raw probabilities, the 0.5 rule, no grade guessed
    assert np.array_equal(plain.probabilities, raw.probabilities) and plain.level_warning is None
    assert plain.grades[STRUCTURES.index("L1")] == "v2" and plain.grades[STRUCTURES.index("L5-S1")] == "v1"


def test_a_study_is_level_shifted_when_its_chain_slides_onto_the_neighbours() -> None:
    sample = make_sample({})
    shifted = make_prediction({}, moves={"L3": at("L4"), "L4": at("L5"), "L5": at("L5", dy=30.0)})
    assert level_shifted(sample, shifted)  # L3 and L4 sit on L4 and L5, whose own channels missed too
    assert not level_shifted(sample, make_prediction({}, moves={"L2": at("L2", dx=9.0)}))  # off target only
    assert level_doubt(np.full(11, 0.8)) == pytest.approx(0.2)
    assert math.isnan(level_doubt(np.array([0.5, math.nan])))


def _grade_samples(n: int, seed: int) -> list[SliceSample]:
    """`_blob_samples` whose discs carry grades v1..v5 (v4/v5 rare), the vertebrae v1/v2, for the grade grader."""
    rng = np.random.default_rng(seed)
    out = []
    for sample in _blob_samples(n, seed):
        labels = list(sample.labels)
        for k in range(5, 11):
            grade = "v1" if "v1" in labels[k] else str(rng.choice(["v2", "v3", "v4", "v5"]))
            labels[k] = frozenset({grade})
        out.append(replace(sample, labels=tuple(labels)))
    return out


def test_grade_grader_trains_attaches_fold_by_fold_and_the_readout_is_fitted_and_scored(tmp_path: Path) -> None:
    samples = _grade_samples(8, seed=5)
    grader = train_grade_grader(samples[:4], GradeRecipe(epochs=1, batch_size=16))
    metrics = held_out_grade_metrics(grader, samples[4:])
    assert 0 <= metrics["grade_accuracy_true_points"] <= 100 and set(metrics["grade_recall_true_points"]) == set(
        DISC_GRADES
    )

    data = write_slices_dataset(samples, tmp_path / "data")
    folds_file = tmp_path / "folds.json"
    folds = {s.study_id: i % 2 for i, s in enumerate(samples)}
    folds_file.write_text(json.dumps({"k": 2, "seed": 0, "folds": folds}))
    runner = CliRunner()
    grades = tmp_path / "grades.pt"
    for fold in ("0", "1", "-1"):  # one call per fold, as two processes share the work
        result = runner.invoke(app, ["train-grade-grader", "--data", str(data), "--folds", str(folds_file), "--out",
                                     str(grades), "--epochs", "1", "--fold", fold])
        assert result.exit_code == 0, result.output
    assert grades.is_file() and fold_checkpoint(grades, 1).is_file()

    network = _network_checkpoint(tmp_path / "net.pt")
    for k in range(2):
        fold_checkpoint(network, k).parent.mkdir(exist_ok=True)
        _network_checkpoint(fold_checkpoint(network, k))
    graded = tmp_path / "graded.pt"
    result = runner.invoke(app, ["train-grader", "--data", str(data), "--folds", str(folds_file), "--out",
                                 str(tmp_path / "g.pt"), "--epochs", "1"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["attach-grader", "--network", str(network), "--grader", str(tmp_path / "g.pt"),
                                 "--out", str(graded), "--folds", "2"])
    assert result.exit_code == 0, result.output
    with_grades = tmp_path / "with-grades.pt"
    result = runner.invoke(app, ["attach-grade-grader", "--model", str(graded), "--grade-grader", str(grades),
                                 "--out", str(with_grades), "--folds", "2", "--int8"])
    assert result.exit_code == 0, result.output
    model, card = load_model(fold_checkpoint(with_grades, 1))
    assert isinstance(model, GradedCCFNet) and model.grade_grader is not None
    assert card.arch == "r18-msc-graded-grades" and card.readout == {} and card.dtype == "int8"
    with pytest.raises(ValueError, match="already has"):
        attach_grade_grader(with_grades, grades, tmp_path / "twice.pt")
    with pytest.raises(ValueError, match="no patch grader"):
        attach_grade_grader(network, grades, tmp_path / "bare.pt")

    raw = predict_out_of_fold(samples, with_grades, folds, readout=False)
    for prediction in raw:
        assert prediction.grade_probabilities is not None
        discs = prediction.grade_probabilities[5:]
        assert np.allclose(discs.sum(axis=1), 1.0) and np.isnan(prediction.grade_probabilities[:5]).all()
        assert 0.0 <= prediction.level_doubt <= 1.0

    result = runner.invoke(app, ["fit-readout", "--data", str(data), "--folds", str(folds_file), "--checkpoint",
                                 str(with_grades)])
    assert result.exit_code == 2 and "localised vertebra points" in result.output  # an untrained network finds none

    # Fit on the raw outputs as if every point had been found (the untrained network localises nothing).
    found = [replace(p, points=s.points) for s, p in zip(samples, raw, strict=True)]
    fold_of = [folds[s.study_id] for s in samples]
    for k in (0, 1, -1):
        keep = [i for i in range(len(samples)) if fold_of[i] != k]
        part = tabulate([samples[i] for i in keep], [found[i] for i in keep], [fold_of[i] for i in keep])
        readout = fit(part, ReadoutAims(), f"test, fold {k} held out")
        path = fold_checkpoint(with_grades, k) if k >= 0 else with_grades
        write_card(path, replace(read_card(path), readout=readout.to_dict()))
    fitted = Readout.from_dict(read_card(with_grades).readout)
    assert set(fitted.calibration) == {StructureType.VERTEBRA, StructureType.DISC} and fitted.grade_rule is not None
    assert fitted.operating_points[StructureType.VERTEBRA].sensitivity is not None

    predictor = Predictor.from_checkpoint(with_grades, "cpu")
    prediction = predictor.predict([samples[0].image])[0]
    assert len(prediction.labels) == 11 and len(prediction.grades) == 11 and prediction.raw_probabilities is not None
    assert set(prediction.grades[5:]) <= {"v1", "v2", "v3", "v4", "abnormal"}

    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", "--data", str(data), "--folds", str(folds_file), "--checkpoint",
                                 str(with_grades), "--out", str(out), "--json", "--record-in-card"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    for key in ("per_class_f1", "ece", "operating_point", "disc_grade", "level_check"):
        assert key in summary, key
    assert summary["confusion"]["disc"]["predicted"] == ["v1", "v2", "v3", "v4", "v5"]
    rate, low, high = summary["reading"]["intervals"]["L-Disc"]  # nothing is localised: the Score is undefined
    assert rate == pytest.approx(summary["L-Disc"]) and low <= rate <= high
    assert "intervals" in read_card(with_grades).metrics


def test_graded_archs_with_grades_are_registered_and_named_in_place() -> None:
    assert with_grades_arch("r18-msc-pair-loc2-graded2-refined") == "r18-msc-pair-loc2-graded2-grades-refined"
    model = create_model("r18-msc-pair-loc2-graded2-grades-refined")
    assert isinstance(model, RefinedCCFNet) and isinstance(model.network, GradedCCFNet)
    assert model.network.grade_grader is not None and model.network.grade_grader.classes == len(DISC_GRADES)
    with pytest.raises(ValueError, match="already"):
        with_grades_arch("r18-msc-graded-grades")
    with pytest.raises(ValueError, match="no patch grader"):
        with_grades_arch("r18-msc-pair")


def test_predictions_without_a_readout_keep_the_binary_rule() -> None:
    prediction = Prediction(points=gt_points(), probabilities=np.full(11, 0.6), confidences=np.ones(11))
    assert prediction.labels == () and prediction.grade_probabilities is None and math.isnan(prediction.level_doubt)
    with pytest.raises(ValueError, match="labels"):
        Prediction(points=gt_points(), probabilities=np.full(11, 0.6), confidences=np.ones(11), labels=("v1",))
