"""The research commands through the real `ccfnet` CLI (Typer's CliRunner), with the shipped checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ccfnet_core.checkpoint import DEFAULT_MODEL_NAME, MODELS_DIR, PHANTOM_MODEL_NAME, load_model
from ccfnet_core.datasets import read_dataset
from worker.cli import app

ROOT = Path(__file__).resolve().parents[2]
TIANCHI = ROOT.parent / "shared" / "data" / "tianchi-slices"
PHANTOM_MODEL = MODELS_DIR / PHANTOM_MODEL_NAME
SHIPPED_MODEL = MODELS_DIR / DEFAULT_MODEL_NAME
needs_tianchi = pytest.mark.skipif(not TIANCHI.is_dir(), reason=f"research slices not present at {TIANCHI}")

runner = CliRunner()


def _json(output: str) -> dict:
    return json.loads(output[output.index("{") :])


def test_model_info_json_has_raw_params_and_macs() -> None:
    result = runner.invoke(app, ["model-info", "--arch", "r50-msc", "--json"])
    assert result.exit_code == 0, result.output
    info = _json(result.output)
    assert round(info["params"] / 1e6, 2) == 10.79 and round(info["macs"] / 1e9, 2) == 22.09


@pytest.fixture(scope="module")
def phantom_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantom-cli")
    result = runner.invoke(app, ["phantom", "--out", str(out), "--studies", "3", "--seed", "11"])
    assert result.exit_code == 0, result.output
    return out


def test_phantom_writes_studies_and_annotations(phantom_folder: Path) -> None:
    studies = [p for p in phantom_folder.iterdir() if p.is_dir()]
    assert len(studies) == 3 and all(any(p.glob("*.dcm")) for p in studies)
    assert len(json.loads((phantom_folder / "annotations.json").read_text())) == 3


def test_phantom_model_finds_the_structures_on_new_phantoms(phantom_folder: Path) -> None:
    samples = read_dataset(phantom_folder)
    errors = []
    for sample in samples:
        study = next(p for p in phantom_folder.iterdir() if p.is_dir() and sample.study_id in _uids(p))
        result = runner.invoke(app, ["predict", str(study), "--checkpoint", str(PHANTOM_MODEL)])
        assert result.exit_code == 0, result.output
        findings = _json(result.output)["findings"]
        assert [f["structure"] for f in findings][:2] == ["L1", "L2"] and len(findings) == 11
        predicted = np.array([[f["x"], f["y"]] for f in findings])
        errors.append(np.linalg.norm((predicted - sample.points) * np.array(sample.spacing_mm[::-1]), axis=1))
    within = float((np.concatenate(errors) <= 6.0).mean())
    print(f"phantom model: {within:.0%} of points within 6 mm on unseen phantoms")
    assert within >= 0.6


def _uids(folder: Path) -> str:
    import pydicom

    first = next(folder.glob("*.dcm"))
    return str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID) + folder.name


def test_predict_npy_writes_an_overlay(tmp_path: Path) -> None:
    slice_path = tmp_path / "slice.npy"
    np.save(slice_path, (np.random.default_rng(0).random((200, 180)) * 255).astype(np.uint8))
    png = tmp_path / "overlay.png"
    result = runner.invoke(app, ["predict", str(slice_path), "--checkpoint", str(PHANTOM_MODEL), "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _json(result.output)["model"]["phantom_only"] is True


def test_predict_with_the_shipped_model_reads_through_its_cards_readout(tmp_path: Path) -> None:
    slice_path = tmp_path / "slice.npy"
    np.save(slice_path, (np.random.default_rng(1).random((200, 180)) * 255).astype(np.uint8))
    result = runner.invoke(app, ["predict", str(slice_path), "--checkpoint", str(SHIPPED_MODEL)])
    assert result.exit_code == 0, result.output
    output = _json(result.output)
    thresholds = load_model(SHIPPED_MODEL)[1].readout["operating_points"]
    for finding in output["findings"]:
        called = finding["probability_abnormal"] >= round(thresholds[finding["type"]]["threshold"], 4)
        if finding["type"] == "vertebra":
            assert finding["label"] == ("v2" if called else "v1")
        else:
            assert finding["grade"] in {"normal", "abnormal", "bulge", "protrusion", "extrusion"}
            assert (finding["grade"] != "normal") == called
    assert "level_warning" in output


def test_bad_input_is_a_message_and_exit_code_not_a_traceback(tmp_path: Path) -> None:
    result = runner.invoke(app, ["predict", str(tmp_path / "missing.dcm"), "--checkpoint", str(PHANTOM_MODEL)])
    assert result.exit_code == 2 and "no such file or folder" in result.output
    assert "Traceback" not in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["predict", str(empty), "--checkpoint", str(PHANTOM_MODEL)])
    assert result.exit_code == 2 and "error:" in result.output


@needs_tianchi
def test_evaluate_with_the_phantom_checkpoint_prints_every_metric(tmp_path: Path) -> None:
    result = runner.invoke(app, ["evaluate", "--data", str(TIANCHI), "--checkpoint", str(PHANTOM_MODEL),
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for key in ("L-Disc", "L-Vertebra", "C-Disc", "C-Vertebra", "Score", "macro-F1"):
        assert re.search(rf"{key}\s+(-?\d+\.\d+|nan)", result.output), key
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "overlay.png").is_file()


@needs_tianchi
def test_out_of_fold_evaluation_reproduces_the_shipped_card_and_docs(tmp_path: Path) -> None:
    result = runner.invoke(app, [
        "evaluate", "--data", str(TIANCHI), "--checkpoint", str(SHIPPED_MODEL),
        "--folds", str(ROOT / "experiments" / "tianchi-folds.json"), "--out", str(tmp_path), "--json",
    ])
    assert result.exit_code == 0, result.output
    metrics = _json(result.output)
    _, card = load_model(SHIPPED_MODEL)
    docs = (ROOT / "docs" / "model.md").read_text()
    for key in ("L-Disc", "L-Vertebra", "C-Disc", "C-Vertebra", "Score"):
        assert metrics[key] == pytest.approx(card.metrics[key], abs=0.05), key
        assert f"{card.metrics[key]:.2f}" in docs, key
    assert metrics["challenge_macro_f1"] == pytest.approx(card.metrics["challenge_macro_f1"], abs=0.005)
    assert metrics["studies"] == 155 and len(metrics["excluded_flagged"]) == 5
    # The readout (issue 26): nested out of fold, the same as the card records and the docs state.
    assert f"{100 * card.metrics['challenge_macro_f1']:.1f}" in docs
    for kind in ("vertebra", "disc"):
        assert metrics["ece"][kind] == pytest.approx(card.metrics["ece"][kind], abs=1e-6)
        assert f"{metrics['ece'][kind]:.3f}" in docs and metrics["ece"][kind] <= 0.05
    sensitivity, specificity = (metrics["operating_point"]["vertebra"][k][0] for k in ("sensitivity", "specificity"))
    assert sensitivity >= 80 and specificity >= 60
    assert metrics["level_check"]["flags_shifted_percent"][0] >= 50
    assert metrics["level_check"]["flags_other_percent"][0] <= 10
    assert "all 155 studies" in card.readout["fitted_on"]
