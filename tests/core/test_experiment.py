"""The experiment runner: folds + final fit per variant, pairs, and a table over whatever folds are done."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ccfnet_core.checkpoint import load_model
from ccfnet_core.datasets import read_dataset
from ccfnet_core.experiment import classifier_sources, load_graders, load_pairs, load_variants, main
from ccfnet_core.folds import make_folds, save_folds
from ccfnet_core.grading import load_grader
from ccfnet_core.phantom import write_phantom_studies
from ccfnet_core.train import TrainConfig

CONFIG = """
[base]
arch = "r18-msc"
input_size = 128
sigma = 4.0
epochs = 1
repeats = 1
batch_size = 4
t0 = 1
amp = false
device = "cpu"

[variants.loc]
class_weight = 0.01

[variants.cls]
class_weight = 1.0

[pairs.both]
localiser = "loc"
classifier = "cls"

[pairs.all3]
localiser = "loc"
classifier = ["cls", "loc"]
logits = "mean"

[graders.graded]
network = "both"
network_share = 0.5
epochs = 1
"""


@pytest.fixture(scope="module")
def phantom_experiment(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("experiment")
    write_phantom_studies(root / "data", 6, seed=8, rows=128, cols=128)
    ids = [s.study_id for s in read_dataset(root / "data")]
    save_folds(root / "folds.json", make_folds(ids, 2, seed=1), 2, 1)
    (root / "exp.toml").write_text(CONFIG)
    return {"data": root / "data", "folds": root / "folds.json", "config": root / "exp.toml", "root": root}


def _args(paths: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--data", str(paths["data"]), "--folds", str(paths["folds"]), "--config", str(paths["config"]),
            "--out", str(out), *extra]


@pytest.mark.slow
def test_a_whole_experiment_scores_variants_and_their_pair_out_of_fold(
    phantom_experiment: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = phantom_experiment["root"] / "runs"
    assert main(_args(phantom_experiment, out, "--parallel", "2")) == 0
    table = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("variant"))
    assert [line.split()[0] for line in table[header + 1 :]] == ["loc", "cls", "both", "all3", "graded"]
    for name in ("loc", "cls", "both", "all3", "graded"):
        metrics = json.loads((out / name / "cv_metrics.json").read_text())
        assert set(metrics["per_fold"]) == {"0", "1"} and metrics["studies"] == 6
        _, card = load_model(out / name / "final.pt")
        assert card.metrics["Score"] == pytest.approx(metrics["Score"], nan_ok=True)
    _, pair_card = load_model(out / "both" / "final.pt")
    assert pair_card.arch == "r18-msc-pair"
    assert pair_card.recipe["localiser"]["weights_sha256"] == load_model(out / "loc" / "final.pt")[1].weights_sha256
    _, ensemble_card = load_model(out / "all3" / "final.pt")
    assert ensemble_card.arch == "r18-msc-ens3"
    digests = [load_model(out / name / "final.pt")[1].weights_sha256 for name in ("cls", "loc")]
    assert [c["weights_sha256"] for c in ensemble_card.recipe["classifiers"]] == digests
    graded, graded_card = load_model(out / "graded" / "final.pt")
    assert graded_card.arch == "r18-msc-pair-graded" and float(graded.network_logit_share) == 0.5
    assert graded_card.recipe["grader"]["weights_sha256"] == load_grader(out / "graded" / "grader.pt")[1].weights_sha256
    assert (out / "graded" / "grader.folds" / "fold1.pt").is_file()


def test_a_partly_done_experiment_is_scored_on_its_finished_folds(
    phantom_experiment: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = phantom_experiment["root"] / "partial"
    for variant in ("loc", "cls"):
        assert main(_args(phantom_experiment, out, "--variant", variant, "--fold", "0")) == 0
    capsys.readouterr()
    assert main(_args(phantom_experiment, out, "--report-only")) == 0
    table = capsys.readouterr().out
    for name in ("loc", "cls", "both", "all3"):
        assert f"{name} [folds 0]" in table
        partial = json.loads((out / name / "cv_metrics_partial.json").read_text())
        assert list(partial["per_fold"]) == ["0"] and partial["studies"] == 3
        assert not (out / name / "cv_metrics.json").exists()
    assert (out / "both" / "final.folds" / "fold0.pt").is_file() and not (out / "both" / "final.pt").exists()
    assert "graded" not in table and not (out / "graded").exists()  # --report-only trains no grader


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("config", sorted((REPO / "experiments").glob("*.toml")), ids=lambda p: p.name)
def test_committed_experiment_configs_are_valid(config: Path) -> None:
    """A typo in a committed experiment (an unknown option, a pair of an unknown source) would otherwise surface
    only on a lent GPU, minutes into its 15."""
    variants = load_variants(config)
    for options in variants.values():
        TrainConfig.from_mapping(options)
    for name, sources in load_pairs(config).items():
        classifiers = (("classifier", c) for c in classifier_sources(sources))
        for role, source in [("localiser", sources["localiser"]), *classifiers]:
            assert source in variants or (REPO / source).is_file(), f"[pairs.{name}] {role} {source} not found"
    networks = {*variants, *load_pairs(config)}
    for name, spec in load_graders(config).items():
        assert spec["network"] in networks or (REPO / spec["network"]).is_file(), f"[graders.{name}] network"
        assert all((REPO / grader).is_file() for grader in spec["graders"]), f"[graders.{name}] grader"


