"""Training: a short phantom run lowers the localisation error, and a run resumes where it stopped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ccfnet_core.checkpoint import load_model
from ccfnet_core.datasets import read_dataset
from ccfnet_core.evaluate import errors_mm
from ccfnet_core.phantom import write_phantom_studies
from ccfnet_core.sample import SliceSample
from ccfnet_core.train import TrainConfig, Trainer, cpu_has_fast_bf16

SHORT = {
    "arch": "r18-msc", "input_size": 128, "sigma": 6.0, "epochs": 6, "repeats": 4, "batch_size": 8,
    "lr": 2e-3, "t0": 6, "aug_strength": 0.25, "class_weight": 0.1, "amp": False, "device": "cpu",
}


@pytest.fixture(scope="module")
def phantom_samples(tmp_path_factory: pytest.TempPathFactory) -> list[SliceSample]:
    folder = tmp_path_factory.mktemp("phantoms")
    write_phantom_studies(folder, 10, seed=5, rows=128, cols=128)
    return read_dataset(folder)


def _median_error(trainer: Trainer, samples: list[SliceSample]) -> float:
    return float(np.nanmedian(errors_mm(samples, trainer.predict(samples))))


@pytest.mark.slow
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_short_phantom_training_lowers_localisation_error(
    phantom_samples: list[SliceSample], tmp_path: Path, amp: bool
) -> None:
    """In float32, and in the bf16 autocast + channels-last path a CPU with native bf16 trains with."""
    if amp and not cpu_has_fast_bf16():
        pytest.skip("this CPU has no native bf16; training stays in float32 here")
    trainer = Trainer(TrainConfig.from_mapping({**SHORT, "amp": amp}), phantom_samples, tmp_path / "run")
    assert trainer.bf16 is amp
    before = _median_error(trainer, phantom_samples)
    trainer.fit()
    after = _median_error(trainer, phantom_samples)
    print(f"median localisation error: {before:.1f} mm before, {after:.1f} mm after")
    assert after < 0.5 * before
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    losses = [float(line.split(",")[1]) for line in history[1:]]
    assert losses[-1] < losses[0]


def test_training_resumes_from_its_state_and_exports_a_card(
    phantom_samples: list[SliceSample], tmp_path: Path
) -> None:
    options = {**SHORT, "epochs": 2, "repeats": 1, "max_steps": 0}
    first = Trainer(TrainConfig.from_mapping({**options, "epochs": 1}), phantom_samples[:4], tmp_path / "a")
    first.fit()
    assert (tmp_path / "a" / "state.pt").is_file()
    with pytest.raises(ValueError, match="another configuration"):
        Trainer(TrainConfig.from_mapping(options), phantom_samples[:4], tmp_path / "a").try_resume()
    resumed = Trainer(TrainConfig.from_mapping({**options, "epochs": 1}), phantom_samples[:4], tmp_path / "a")
    assert resumed.try_resume() and resumed.epoch == 1
    card = resumed.export(tmp_path / "model.pt", {
        "training_data": "4 phantoms", "intended_use": "test", "phantom_only": True,
    })
    _, loaded = load_model(tmp_path / "model.pt")
    assert loaded.weights_sha256 == card.weights_sha256 and loaded.arch == "r18-msc"
    assert loaded.device_uid.startswith("2.25.") and len(loaded.device_uid) <= 64
    assert loaded.recipe["input_size"] == 128 and loaded.phantom_only
