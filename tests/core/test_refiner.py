"""The point refiner: patch geometry of its targets, learning to pull points in, a refined checkpoint out of fold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_grader import SIZE, _blob_samples, _network_checkpoint, _spine_points, write_slices_dataset
from typer.testing import CliRunner

from ccfnet_core.checkpoint import CheckpointError, load_model
from ccfnet_core.evaluate import fold_checkpoint, predict_out_of_fold
from ccfnet_core.grader import PatchGrader, patch_offset_to_pixels, spine_angles
from ccfnet_core.inference import predict_images
from ccfnet_core.model import CCFNet, GradedCCFNet, RefinedCCFNet, create_model, refined_arch
from ccfnet_core.refiner import PointRefiner, RefinerJitter, training_patches
from ccfnet_core.refining import (
    REFINED_LIMITATION,
    RefinerRecipe,
    held_out_error,
    load_refiner,
    train_refiner,
)
from worker.cli import app


def test_a_training_target_is_where_the_true_point_shows_in_its_patch() -> None:
    """A bright dot at each true point appears in the patch at the target's (u, v); mapped back, it is the point."""
    points = _spine_points((70, 20), level=24, angle_deg=25)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    image = np.zeros((SIZE, SIZE), dtype=np.float32)
    for x, y in points:
        image[(xx - x) ** 2 + (yy - y) ** 2 <= 2.0] = 1.0
    jitter = RefinerJitter(shift_mm=6.0, rotation_deg=0.0, log_scale=0.0, log_gain=0.0, log_gamma=0.0)
    patches, target, present = training_patches(torch.from_numpy(image), points, jitter, np.random.default_rng(3))
    assert present.all() and patches.shape == (11, 1, 64, 64)
    for patch, (u, v) in zip(patches[:, 0].numpy(), target.numpy(), strict=True):
        assert abs(u) <= 1 and abs(v) <= 1
        row, col = int((v + 1) / 2 * 64), int((u + 1) / 2 * 64)
        window = patch[max(row - 2, 0) : row + 3, max(col - 2, 0) : col + 3]
        assert window.max() > 0.3  # the dot is at the target, not elsewhere in the patch
    # patch_offset_to_pixels inverts the patch frame: centre + R(angle) (u, v) radius = the true point
    angles = spine_angles(points)
    radii = np.full(11, 10.0)
    offsets = np.random.default_rng(0).uniform(-1, 1, size=(11, 2))
    moved = patch_offset_to_pixels(offsets, angles, radii)
    assert np.allclose(np.linalg.norm(moved, axis=1), np.linalg.norm(offsets, axis=1) * 10.0)


def test_the_refiner_learns_to_pull_displaced_points_onto_their_structure() -> None:
    refiner = train_refiner(_blob_samples(24, seed=1), RefinerRecipe(epochs=8, batch_size=32, seed=0))
    error = held_out_error(refiner, _blob_samples(10, seed=2))
    assert error["median_mm_refined"] < 0.6 * error["median_mm_displaced"]


def test_a_refined_network_keeps_its_maps_moves_its_points_and_grades_where_they_end() -> None:
    torch.manual_seed(0)
    network = create_model("r18-msc")
    assert isinstance(network, CCFNet)
    refiners = [PointRefiner().eval(), PointRefiner().eval()]
    grader = PatchGrader().eval()
    graded = GradedCCFNet(network, [grader], network_logit_share=0.0).eval()
    refined = RefinedCCFNet(graded, refiners).eval()
    image = np.random.default_rng(1).random((3, 150, 140), dtype=np.float32)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(refined(x), network.eval()(x))
    plain = predict_images(network, [image], 128, 16, torch.device("cpu"))[0]
    moved = predict_images(refined, [image], 128, 16, torch.device("cpu"))[0]
    middle = torch.from_numpy(image[1])
    expected = (refiners[0].refine(middle, plain.points) + refiners[1].refine(middle, plain.points)) / 2
    assert np.allclose(moved.points, expected) and not np.allclose(moved.points, plain.points)
    with torch.no_grad():
        grade = torch.sigmoid(grader.grade(middle, expected).double()).numpy()
    assert np.allclose(moved.probabilities, grade, atol=1e-5)
    with pytest.raises(ValueError, match="at least one refiner"):
        RefinedCCFNet(network, [])
    assert refined_arch("r18-msc-pair-graded2", 1) == "r18-msc-pair-graded2-refined"
    with pytest.raises(ValueError, match="already has a point refiner"):
        refined_arch("r18-msc-refined")


def test_a_missing_point_stays_missing_and_too_few_points_are_returned_unchanged() -> None:
    refiner = PointRefiner().eval()
    points = _spine_points((70, 20), level=24, angle_deg=0)
    points[3] = np.nan
    image = torch.rand(SIZE, SIZE)
    out = refiner.refine(image, points)
    assert np.isnan(out[3]).all() and np.isfinite(np.delete(out, 3, axis=0)).all()
    lonely = np.full((11, 2), np.nan)
    lonely[0] = (50, 50)
    assert np.array_equal(refiner.refine(image, lonely), lonely, equal_nan=True)


def test_train_and_attach_fold_by_fold_then_evaluate_out_of_fold(tmp_path: Path) -> None:
    samples = _blob_samples(8, seed=3)
    data = write_slices_dataset(samples, tmp_path / "data")
    folds_file = tmp_path / "folds.json"
    folds = {s.study_id: i % 2 for i, s in enumerate(samples)}
    folds_file.write_text(json.dumps({"k": 2, "seed": 0, "folds": folds}))

    runner = CliRunner()
    refiner = tmp_path / "refiner.pt"
    args = ["train-refiner", "--data", str(data), "--folds", str(folds_file), "--out", str(refiner), "--epochs", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    fold0 = fold_checkpoint(refiner, 0)
    assert refiner.is_file() and fold0.is_file() and fold_checkpoint(refiner, 1).is_file()
    card = load_refiner(fold0)[1]
    assert card.metrics["train_studies"] == 4 and card.metrics["held_out_studies"] == 4
    assert card.metrics["median_mm_displaced"] > 0
    stamp = fold0.stat().st_mtime_ns
    assert runner.invoke(app, args).exit_code == 0
    assert fold0.stat().st_mtime_ns == stamp  # an existing fold refiner is kept, not trained again

    network = _network_checkpoint(tmp_path / "net.pt")
    for k in range(2):
        fold_checkpoint(network, k).parent.mkdir(exist_ok=True)
        _network_checkpoint(fold_checkpoint(network, k))
    refined = tmp_path / "refined.pt"
    result = runner.invoke(app, ["attach-refiner", "--network", str(network), "--refiner", str(refiner),
                                 "--out", str(refined), "--folds", "2"])
    assert result.exit_code == 0, result.output
    model, refined_card = load_model(fold_checkpoint(refined, 1))
    assert isinstance(model, RefinedCCFNet) and refined_card.arch == "r18-msc-refined"
    assert refined_card.limitations[-1] == REFINED_LIMITATION
    fold1_refiner = load_refiner(fold_checkpoint(refiner, 1))[1]
    assert refined_card.recipe["refiners"][0]["weights_sha256"] == fold1_refiner.weights_sha256
    predictions = predict_out_of_fold(samples, refined, folds)
    assert all(np.isfinite(p.points).all() for p in predictions)

    result = runner.invoke(app, ["attach-refiner", "--network", str(refined), "--refiner", str(refiner),
                                 "--out", str(tmp_path / "twice.pt")])
    assert result.exit_code == 2 and "already has a refiner" in result.output
    with pytest.raises(CheckpointError, match="not a point refiner"):
        load_refiner(network)
    missing = runner.invoke(app, ["attach-refiner", "--network", str(network), "--refiner",
                                  str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x.pt")])
    assert missing.exit_code == 2 and "nope.pt" in missing.output
