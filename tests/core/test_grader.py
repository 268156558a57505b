"""The patch grader: spine-aligned patches, training fold by fold, and a graded checkpoint read out of fold."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ccfnet_core.checkpoint import CheckpointError, load_model, new_card, save_model
from ccfnet_core.evaluate import fold_checkpoint, predict_out_of_fold
from ccfnet_core.grader import SPINAL_ORDER, PatchGrader, crop_patches, level_pixels, spine_angles
from ccfnet_core.grading import GRADED_LIMITATION, GraderRecipe, attach_grader, held_out_auc, load_grader, train_grader
from ccfnet_core.inference import predict_images
from ccfnet_core.model import CCFNet, GradedCCFNet, create_model
from ccfnet_core.sample import SliceSample
from worker.cli import app

SIZE = 160


def _spine_points(top: tuple[float, float], level: float, angle_deg: float) -> np.ndarray:
    """11 points in channel order, a half level apart along a straight spine tilted by angle_deg from vertical."""
    step = np.array([math.sin(math.radians(angle_deg)), math.cos(math.radians(angle_deg))]) * level / 2
    points = np.zeros((11, 2))
    for position, index in enumerate(SPINAL_ORDER):
        points[index] = np.array(top) + position * step
    return points


def test_the_level_is_measured_on_the_points_and_ignores_one_misplaced_point() -> None:
    points = _spine_points((80, 20), level=24, angle_deg=20)
    assert level_pixels(points) == pytest.approx(24)
    points[SPINAL_ORDER[5]] += (30, 0)
    assert level_pixels(points) == pytest.approx(24)
    with pytest.raises(ValueError, match="two distinct points"):
        level_pixels(np.full((11, 2), np.nan))
    assert level_pixels(np.full((11, 2), 5.0), fallback=20.0) == 20.0


def test_a_degenerate_prediction_still_gets_patches_and_a_grade() -> None:
    """All points on one pixel (a blank image can do that): no scale on the points, the slice's size gives one."""
    image = torch.rand(120, 100)
    patches = crop_patches(image, np.full((11, 2), 50.0))
    assert patches.shape == (11, 1, 64, 64) and torch.isfinite(patches).all()
    with torch.no_grad():
        assert torch.isfinite(PatchGrader().eval().grade(image, np.full((11, 2), 50.0))).all()


def test_a_patch_is_centred_on_its_point_and_turns_the_spine_vertical() -> None:
    points = _spine_points((60, 20), level=24, angle_deg=30)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    # a bright band along the spine's axis, through the points
    direction = points[SPINAL_ORDER[-1]] - points[SPINAL_ORDER[0]]
    normal = np.array([-direction[1], direction[0]]) / np.hypot(*direction)
    distance = np.abs((xx - points[5, 0]) * normal[0] + (yy - points[5, 1]) * normal[1])
    image = torch.from_numpy((distance < 2.5).astype(np.float32))
    assert np.allclose(spine_angles(points), -math.radians(30))
    patches = crop_patches(image, points)[:, 0].numpy()
    assert patches.shape == (11, 64, 64)
    for patch in patches:
        column_mass = patch.sum(axis=0)
        # vertical in the patch: all the band's mass in the middle columns, along every row
        assert column_mass[26:38].sum() > 0.95 * column_mass.sum()
        assert (patch[:, 28:36].max(axis=1) > 0.5).mean() > 0.9


def test_a_graded_network_keeps_its_maps_and_reads_the_grader_at_its_points() -> None:
    torch.manual_seed(0)
    network = create_model("r18-msc")
    assert isinstance(network, CCFNet)
    graders = [PatchGrader(), PatchGrader()]
    graded = GradedCCFNet(network, graders, network_logit_share=0.25).eval()
    image = np.random.default_rng(1).random((3, 150, 140), dtype=np.float32)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(graded(x), network.eval()(x))
    plain = predict_images(network, [image], 128, 16, torch.device("cpu"))[0]
    both = predict_images(graded, [image], 128, 16, torch.device("cpu"))[0]
    assert np.array_equal(plain.points, both.points)
    with torch.no_grad():
        middle = torch.from_numpy(image[1])
        grader_logits = sum(g.grade(middle, plain.points).double().numpy() for g in graders) / 2
    network_logits = np.log(plain.probabilities / (1 - plain.probabilities))
    expected = 1 / (1 + np.exp(-(0.25 * network_logits + 0.75 * grader_logits)))
    assert np.allclose(both.probabilities, expected, atol=1e-5)
    with pytest.raises(ValueError, match="share"):
        GradedCCFNet(network, [PatchGrader()], network_logit_share=1.0)
    with pytest.raises(ValueError, match="at least one grader"):
        GradedCCFNet(network, [])


def _blob_samples(n: int, seed: int) -> list[SliceSample]:
    """Slices whose abnormal structures are bright discs at their points, normal ones dark: a learnable grade."""
    rng = np.random.default_rng(seed)
    samples = []
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for i in range(n):
        top = (SIZE / 2 + rng.normal(0, 5), 18.0)
        points = _spine_points(top, level=24 + rng.normal(0, 1), angle_deg=rng.normal(0, 8))
        abnormal = rng.random(11) < 0.5
        image = 0.2 + 0.05 * rng.random((SIZE, SIZE))
        for (x, y), bad in zip(points, abnormal, strict=True):
            image[(xx - x) ** 2 + (yy - y) ** 2 < 16] = 0.9 if bad else 0.4
        labels = tuple(frozenset({"v2"} if bad else {"v1"}) for bad in abnormal)
        samples.append(
            SliceSample(f"blob{seed}-{i}", np.repeat(image[None].astype(np.float32), 3, 0), points, labels, (1.0, 1.0))
        )
    return samples


def test_the_grader_learns_a_visible_grade_and_scores_held_out_studies() -> None:
    grader = train_grader(_blob_samples(24, seed=1), GraderRecipe(epochs=6, batch_size=32, seed=0))
    auc = held_out_auc(grader, _blob_samples(12, seed=2))
    assert auc["AUC-Disc-true-points"] > 90
    assert auc["AUC-Vertebra-true-points"] > 90


def write_slices_dataset(samples: list[SliceSample], data: Path) -> Path:
    """`samples` as a tianchi-slices folder (uint8 npy images + annotations.json), for the CLI commands."""
    (data / "images").mkdir(parents=True)
    entries = []
    for sample in samples:
        image_path = f"images/{sample.study_id}.npy"
        np.save(data / image_path, (sample.image[1] * 255).astype(np.uint8))
        points = [
            {"coord": [float(x), float(y)], "tag": {"identification": name, kind: label}}
            for (x, y), name, kind, label in zip(
                sample.points,
                ("L1", "L2", "L3", "L4", "L5", "T12-L1", "L1-L2", "L2-L3", "L3-L4", "L4-L5", "L5-S1"),
                ("vertebra",) * 5 + ("disc",) * 6,
                (next(iter(labels)) for labels in sample.labels),
                strict=True,
            )
        ]
        entries.append({"studyUid": sample.study_id, "image": image_path, "width": SIZE, "height": SIZE,
                        "pixel_spacing_estimate": 1.0, "flag": None,
                        "data": [{"annotation": [{"data": {"point": points}}]}]})
    (data / "annotations.json").write_text(json.dumps(entries))
    return data


def _network_checkpoint(path: Path) -> Path:
    torch.manual_seed(4)
    card = new_card(arch="r18-msc", input_size=128, stride=16, sigma=4.0, training_data="test",
                    intended_use="test", phantom_only=True)
    save_model(path, create_model("r18-msc"), card, half=True)
    return path


def test_train_and_attach_fold_by_fold_then_evaluate_out_of_fold(tmp_path: Path) -> None:
    samples = _blob_samples(8, seed=3)
    data = write_slices_dataset(samples, tmp_path / "data")
    folds_file = tmp_path / "folds.json"
    folds = {s.study_id: i % 2 for i, s in enumerate(samples)}
    folds_file.write_text(json.dumps({"k": 2, "seed": 0, "folds": folds}))

    runner = CliRunner()
    grader = tmp_path / "grader.pt"
    args = ["train-grader", "--data", str(data), "--folds", str(folds_file), "--out", str(grader), "--epochs", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    fold0 = fold_checkpoint(grader, 0)
    assert grader.is_file() and fold0.is_file() and fold_checkpoint(grader, 1).is_file()
    card = load_grader(fold0)[1]
    assert card.metrics["train_studies"] == 4 and card.metrics["held_out_studies"] == 4
    stamp = fold0.stat().st_mtime_ns
    assert runner.invoke(app, args).exit_code == 0
    assert fold0.stat().st_mtime_ns == stamp  # an existing fold grader is kept, not trained again

    network = _network_checkpoint(tmp_path / "net.pt")
    for k in range(2):
        fold_checkpoint(network, k).parent.mkdir(exist_ok=True)
        _network_checkpoint(fold_checkpoint(network, k))
    graded = tmp_path / "graded.pt"
    result = runner.invoke(app, ["attach-grader", "--network", str(network), "--grader", str(grader),
                                 "--out", str(graded), "--folds", "2", "--network-share", "0.5"])
    assert result.exit_code == 0, result.output
    model, graded_card = load_model(fold_checkpoint(graded, 1))
    assert isinstance(model, GradedCCFNet) and graded_card.arch == "r18-msc-graded"
    assert float(model.network_logit_share) == 0.5
    assert graded_card.limitations[-1] == GRADED_LIMITATION
    assert graded_card.recipe["grader"]["weights_sha256"] == load_grader(fold_checkpoint(grader, 1))[1].weights_sha256
    predictions = predict_out_of_fold(samples, graded, folds)
    assert all(np.isfinite(p.probabilities).all() for p in predictions)

    result = runner.invoke(app, ["attach-grader", "--network", str(graded), "--grader", str(grader),
                                 "--out", str(tmp_path / "twice.pt")])
    assert result.exit_code == 2 and "already has a grader" in result.output
    with pytest.raises(CheckpointError, match="not a patch grader"):
        load_grader(network)
    bad_folds = tmp_path / "bad.json"
    bad_folds.write_text(json.dumps({"k": 2, "seed": 0, "folds": {"other": 0}}))
    result = runner.invoke(app, ["train-grader", "--data", str(data), "--folds", str(bad_folds), "--out",
                                 str(tmp_path / "g2.pt")])
    assert result.exit_code == 2 and "not in" in result.output
    attach_grader(network, grader, tmp_path / "single.pt")
    assert load_model(tmp_path / "single.pt")[1].recipe["network_logit_share"] == 0.0
    result = runner.invoke(app, ["attach-grader", "--network", str(network), "--grader", str(grader), "--grader",
                                 str(fold0), "--out", str(tmp_path / "two.pt")])
    assert result.exit_code == 0, result.output
    two, two_card = load_model(tmp_path / "two.pt")
    assert isinstance(two, GradedCCFNet) and len(two.graders) == 2 and two_card.arch == "r18-msc-graded2"
    assert [g["file"] for g in two_card.recipe["graders"]] == ["grader.pt", "fold0.pt"]
