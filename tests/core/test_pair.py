"""A pair checkpoint gives the localiser's points and the classifier's P(abnormal) at those points."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ccfnet_core.checkpoint import (
    INT8_SCALE_SUFFIX,
    ModelCard,
    load_model,
    new_card,
    read_checkpoint,
    save_model,
    write_card,
)
from ccfnet_core.decode import forward_tta
from ccfnet_core.evaluate import fold_checkpoint, predict_out_of_fold, record_in_card
from ccfnet_core.experiment import load_pairs
from ccfnet_core.grader import PatchGrader
from ccfnet_core.inference import Predictor, resize_input
from ccfnet_core.model import (
    CCFNet,
    GradedCCFNet,
    PairedCCFNet,
    combined_arch,
    count_parameters,
    create_model,
    split_output,
)
from ccfnet_core.pair import SECOND_LOCALISER_LIMITATION, add_localiser, assemble_pair, assemble_pair_with_folds
from ccfnet_core.sample import SliceSample
from ccfnet_core.train import TrainConfig, Trainer
from worker.cli import app

SIZE = 128


def _network(seed: int) -> CCFNet:
    """An r18-msc with weights large enough that its maps differ from another seed's."""
    torch.manual_seed(seed)
    model = create_model("r18-msc")
    assert isinstance(model, CCFNet)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=0.05)
    return model.eval()


def _card(**overrides: object) -> ModelCard:
    fields: dict[str, object] = {
        "arch": "r18-msc", "input_size": SIZE, "stride": 16, "sigma": 4.0, "training_data": "test",
        "intended_use": "test", "phantom_only": True, "limitations": ("single slice",),
    }
    return new_card(**{**fields, **overrides})


def _save(path: Path, seed: int, **overrides: object) -> Path:
    save_model(path, _network(seed), _card(**overrides), half=True)
    return path


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [rng.random((3, 150, 140), dtype=np.float32) for _ in range(n)]


def test_the_pair_forward_is_the_localisers_point_maps_and_the_classifiers_logits() -> None:
    loc, cls = _network(1), _network(2)
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        out, a, b = PairedCCFNet(loc, cls)(x), loc(x), cls(x)
    assert torch.equal(out[:, :33], a[:, :33]) and torch.equal(out[:, 33:], b[:, 33:])
    assert not torch.allclose(a[:, 33:], b[:, 33:])
    assert count_parameters(create_model("r18-msc-pair")) == 2 * count_parameters(create_model("r18-msc"))
    with torch.no_grad():
        mean = PairedCCFNet(loc, cls, localiser_logit_share=0.5)(x)
    assert torch.equal(mean[:, :33], a[:, :33])
    torch.testing.assert_close(mean[:, 33:], (a[:, 33:] + b[:, 33:]) / 2)


def test_an_ensemble_averages_its_classifiers_logits_and_keeps_the_pairs_weights_layout() -> None:
    loc, cls, extra = _network(1), _network(2), _network(3)
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        a, b, c = loc(x), cls(x), extra(x)
        classifiers = PairedCCFNet(loc, cls, extra_classifiers=[extra])(x)
        every = PairedCCFNet(loc, cls, localiser_logit_share=1 / 3, extra_classifiers=[extra])(x)
    assert torch.equal(classifiers[:, :33], a[:, :33])
    torch.testing.assert_close(classifiers[:, 33:], (b[:, 33:] + c[:, 33:]) / 2)
    torch.testing.assert_close(every[:, 33:], (a[:, 33:] + b[:, 33:] + c[:, 33:]) / 3)
    assert count_parameters(create_model("r18-msc-ens3")) == 3 * count_parameters(create_model("r18-msc"))
    # a pair's state dict has no extra keys, so the shipped pair's weights digest is unchanged
    assert not any(key.startswith("extra_classifiers") for key in PairedCCFNet(loc, cls).state_dict())
    with pytest.raises(ValueError, match="3-5 networks, not 6"):
        combined_arch("r18-msc", 5)


@pytest.mark.parametrize(("logits", "classifiers"), [("classifier", 1), ("mean", 1), ("mean", 2)])
def test_an_assembled_pair_predicts_localiser_points_and_classifier_probabilities_there(
    tmp_path: Path, logits: str, classifiers: int
) -> None:
    loc = _save(tmp_path / "loc.pt", 1)
    cls_paths = [_save(tmp_path / f"cls{i}.pt", 2 + i) for i in range(classifiers)]
    card = assemble_pair(loc, cls_paths, tmp_path / "pair.pt", logits=logits)
    model, loaded = load_model(tmp_path / "pair.pt")
    arch = "r18-msc-pair" if classifiers == 1 else "r18-msc-ens3"
    assert isinstance(model, PairedCCFNet) and loaded.arch == arch == card.arch
    recipe = loaded.recipe
    assert recipe["logits"] == logits
    assert recipe["localiser"]["weights_sha256"] == load_model(loc)[1].weights_sha256
    sources = [recipe["classifier"]] if classifiers == 1 else recipe["classifiers"]
    assert [s["weights_sha256"] for s in sources] == [load_model(path)[1].weights_sha256 for path in cls_paths]

    images = _images(3)
    pair_predictions = Predictor.from_checkpoint(tmp_path / "pair.pt", "cpu").predict(images)
    loc_predictions = Predictor.from_checkpoint(loc, "cpu").predict(images)
    batch = torch.cat([resize_input(image, SIZE) for image in images])
    with torch.no_grad():
        each_logits = [split_output(forward_tta(load_model(path)[0], batch)).logits for path in cls_paths]
        loc_heat, _, _, loc_logits = split_output(forward_tta(load_model(loc)[0], batch))
    if logits == "mean":
        each_logits.append(loc_logits)
    cls_logits = torch.stack(each_logits).mean(0)
    cells = loc_heat.flatten(2).argmax(-1)
    expected = torch.sigmoid(cls_logits.flatten(2).gather(2, cells[..., None]).squeeze(-1)).numpy()
    for pair_pred, loc_pred, probs in zip(pair_predictions, loc_predictions, expected, strict=True):
        np.testing.assert_allclose(pair_pred.points, loc_pred.points, atol=1e-2)
        np.testing.assert_allclose(pair_pred.probabilities, probs, atol=1e-5)
    assert not np.allclose([p.probabilities for p in pair_predictions], [p.probabilities for p in loc_predictions])


def test_sources_that_do_not_match_are_refused_by_name(tmp_path: Path) -> None:
    loc = _save(tmp_path / "loc.pt", 1)
    with pytest.raises(ValueError, match="input_size"):
        assemble_pair(loc, _save(tmp_path / "big.pt", 2, input_size=256), tmp_path / "pair.pt")
    assemble_pair(loc, _save(tmp_path / "cls.pt", 2), tmp_path / "pair.pt")
    with pytest.raises(ValueError, match="not of pairs"):
        assemble_pair(tmp_path / "pair.pt", loc, tmp_path / "pair2.pt")
    assert not (tmp_path / "pair2.pt").exists()
    sample = SliceSample("s", np.zeros((3, 64, 64), np.float32), np.full((11, 2), 30.0), (frozenset(),) * 11, (1, 1))
    with pytest.raises(ValueError, match="is a pair"):
        Trainer(TrainConfig(arch="r18-msc-pair", input_size=64, device="cpu"), [sample], tmp_path / "run")


def test_fold_models_are_paired_fold_by_fold_and_score_out_of_fold(tmp_path: Path) -> None:
    loc, cls = _save(tmp_path / "loc.pt", 1), _save(tmp_path / "cls.pt", 2)
    for k in range(2):
        _save(fold_checkpoint(loc, k), 10 + k)
    with pytest.raises(FileNotFoundError, match=r"cls\.folds/fold0\.pt"):
        assemble_pair_with_folds(loc, cls, tmp_path / "pair.pt", 2)
    for k in range(2):
        _save(fold_checkpoint(cls, k), 20 + k)
    assemble_pair_with_folds(loc, cls, tmp_path / "pair.pt", 2)
    samples = [
        SliceSample(f"s{i}", image, np.full((11, 2), 40.0), (frozenset({"v1"}),) * 11, (1.0, 1.0))
        for i, image in enumerate(_images(4))
    ]
    folds = {"s0": 0, "s1": 1, "s2": 0, "s3": 1}
    pair_oof = predict_out_of_fold(samples, tmp_path / "pair.pt", folds, "cpu")
    loc_oof = predict_out_of_fold(samples, loc, folds, "cpu")
    for i, sample in enumerate(samples):
        fold_loc = Predictor.from_checkpoint(fold_checkpoint(loc, folds[sample.study_id]), "cpu")
        np.testing.assert_allclose(pair_oof[i].points, fold_loc.predict([sample.image])[0].points, atol=1e-2)
        np.testing.assert_allclose(pair_oof[i].points, loc_oof[i].points, atol=1e-2)


def test_the_cli_pairs_checkpoints_and_says_what_is_missing(tmp_path: Path) -> None:
    runner = CliRunner()
    loc, cls = _save(tmp_path / "loc.pt", 1), _save(tmp_path / "cls.pt", 2)
    sources = ["pair", "--localiser", str(loc), "--classifier", str(cls)]
    ok = runner.invoke(app, [*sources, "--out", str(tmp_path / "p.pt")])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["arch"] == "r18-msc-pair"
    missing = runner.invoke(app, [*sources, "--out", str(tmp_path / "q.pt"), "--folds", "4"])
    assert missing.exit_code == 2 and "loc.folds/fold0.pt" in missing.output and "Traceback" not in missing.output
    bad = runner.invoke(app, [*sources, "--out", str(tmp_path / "r.pt"), "--logits", "max"])
    assert bad.exit_code == 2 and "classifier, mean" in bad.output and not (tmp_path / "r.pt").exists()
    second = _save(tmp_path / "cls2.pt", 3)
    ensemble = runner.invoke(app, [*sources, "--classifier", str(second), "--out", str(tmp_path / "e.pt")])
    assert ensemble.exit_code == 0, ensemble.output
    assert json.loads(ensemble.output)["arch"] == "r18-msc-ens3"


def test_experiment_pairs_need_both_sources(tmp_path: Path) -> None:
    config = tmp_path / "exp.toml"
    config.write_text('[variants.a]\n[pairs.p]\nlocaliser = "a"\nclassifier = "models/x.pt"\n')
    assert load_pairs(config) == {"p": {"localiser": "a", "classifier": "models/x.pt", "logits": "classifier"}}
    config.write_text('[pairs.p]\nlocaliser = "a"\nclassifier = ["b", "models/x.pt"]\nlogits = "mean"\n')
    assert load_pairs(config)["p"]["classifier"] == ["b", "models/x.pt"]
    config.write_text('[pairs.p]\nlocaliser = "a"\nclassifier = []\n')
    with pytest.raises(ValueError, match="a variant or path, or a list of them"):
        load_pairs(config)
    config.write_text('[pairs.p]\nlocaliser = "a"\n')
    with pytest.raises(ValueError, match="needs `localiser` and `classifier`"):
        load_pairs(config)
    config.write_text('[pairs.p]\nlocaliser = "a"\nclassifier = "b"\nlogits = "max"\n')
    with pytest.raises(ValueError, match=r"\[pairs\.p\] pair logits must be one of classifier, mean"):
        load_pairs(config)


def test_a_second_localiser_is_averaged_into_every_map_the_localiser_gives() -> None:
    loc, cls, second = _network(1), _network(2), _network(3)
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        a, b, c = loc(x), cls(x), second(x)
        out = PairedCCFNet(loc, cls, localiser_logit_share=0.5, extra_localisers=[second])(x)
    torch.testing.assert_close(out[:, :33], (a[:, :33] + c[:, :33]) / 2)
    torch.testing.assert_close(out[:, 33:], 0.5 * b[:, 33:] + 0.5 * (a[:, 33:] + c[:, 33:]) / 2)
    assert count_parameters(create_model("r18-msc-pair-loc2")) == 3 * count_parameters(create_model("r18-msc"))
    assert combined_arch("r18-msc", 1, localisers=2) == "r18-msc-pair-loc2"
    with pytest.raises(ValueError, match="1-2 localisers, not 3"):
        combined_arch("r18-msc", 1, localisers=3)


def _graded_pair(path: Path) -> Path:
    torch.manual_seed(5)
    model = GradedCCFNet(PairedCCFNet(_network(1), _network(2), 0.5), [PatchGrader()], network_logit_share=0.25)
    save_model(path, model, _card(arch="r18-msc-pair-graded", outputs="points; grades"), half=True)
    return path


@pytest.mark.parametrize("int8", [False, True])
def test_add_localiser_keeps_the_grader_and_averages_the_points_of_both_localisers(
    tmp_path: Path, int8: bool
) -> None:
    graded, second = _graded_pair(tmp_path / "graded.pt"), _save(tmp_path / "loc2.pt", 3)
    card = add_localiser(graded, second, tmp_path / "loc2-graded.pt", int8=int8)
    model, loaded = load_model(tmp_path / "loc2-graded.pt")
    assert loaded.arch == card.arch == "r18-msc-pair-loc2-graded" and loaded.dtype == ("int8" if int8 else "float16")
    assert loaded.recipe["second_localiser"]["weights_sha256"] == load_model(second)[1].weights_sha256
    assert loaded.limitations[-1] == SECOND_LOCALISER_LIMITATION
    assert isinstance(model, GradedCCFNet) and isinstance(model.network, PairedCCFNet)
    assert float(model.network_logit_share) == 0.25 and len(model.network.extra_localisers) == 1

    before, _ = load_model(graded)
    assert isinstance(before, GradedCCFNet) and isinstance(before.network, PairedCCFNet)
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = (before.network.localiser(x) + load_model(second)[0](x))[:, :33] / 2
        got = model(x)[:, :33]
    if int8:  # int8 weights carry their rounding (up to half a 127th of each filter's largest weight) through
        relative = float((got - expected).norm() / expected.norm())
        print(f"int8 relative error of the point maps: {relative:.4f}")
        assert 0 < relative < 0.05
    else:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if int8:
        assert (tmp_path / "loc2-graded.pt").stat().st_size < 0.6 * (tmp_path / "loc2.pt").stat().st_size * 3

    with pytest.raises(ValueError, match="already has two localisers"):
        add_localiser(tmp_path / "loc2-graded.pt", second, tmp_path / "again.pt")
    with pytest.raises(ValueError, match="not to a single network"):
        add_localiser(second, second, tmp_path / "single.pt")
    with pytest.raises(ValueError, match="input_size"):
        add_localiser(graded, _save(tmp_path / "big.pt", 4, input_size=256), tmp_path / "big-pair.pt")
    assert not any((tmp_path / name).exists() for name in ("again.pt", "single.pt", "big-pair.pt"))


def test_int8_weights_load_within_their_scale_and_a_recorded_card_keeps_them(tmp_path: Path) -> None:
    network = _network(1)
    card = save_model(tmp_path / "int8.pt", network, _card(), int8=True)
    stored_card, stored = read_checkpoint(tmp_path / "int8.pt")
    assert card.dtype == stored_card.dtype == "int8"
    conv = "layers.0.0.conv1.weight"
    original = network.get_parameter(conv).detach()
    assert stored[conv].dtype == torch.int8
    assert stored[conv + INT8_SCALE_SUFFIX].shape == (original.shape[0],)
    assert stored["conv1.weight"].dtype == torch.float16  # the stem is below INT8_MIN_ELEMENTS
    loaded, _ = load_model(tmp_path / "int8.pt")
    assert isinstance(loaded, CCFNet)
    scale = stored[conv + INT8_SCALE_SUFFIX].reshape(-1, 1, 1, 1)
    error = (loaded.get_parameter(conv).detach() - original).abs()
    assert bool((error <= scale / 2 + 1e-7).all()) and float(error.max()) > 0
    assert not any(key.endswith(INT8_SCALE_SUFFIX) for key in loaded.state_dict())

    write_card(tmp_path / "int8.pt", replace(stored_card, metrics={"Score": 1.0}))
    rewritten_card, rewritten = read_checkpoint(tmp_path / "int8.pt")
    assert rewritten_card.metrics == {"Score": 1.0} and rewritten_card.weights_sha256 == card.weights_sha256
    assert rewritten_card.dtype == "int8" and torch.equal(rewritten[conv], stored[conv])
    summary = {key: 50.0 for key in ("L-Disc", "L-Vertebra", "C-Disc", "C-Vertebra", "Score")}
    record_in_card(tmp_path / "int8.pt", {**summary, "challenge_macro_f1": 0.3, "studies": 4}, {0: summary}, 2)
    recorded_card, recorded = read_checkpoint(tmp_path / "int8.pt")
    assert recorded_card.metrics["Score"] == 50.0 and recorded_card.metrics["per_fold"] == {0: summary}
    assert recorded_card.weights_sha256 == card.weights_sha256 and torch.equal(recorded[conv], stored[conv])


def test_the_cli_adds_a_localiser_and_names_what_is_missing(tmp_path: Path) -> None:
    runner = CliRunner()
    graded, second = _graded_pair(tmp_path / "graded.pt"), _save(tmp_path / "loc2.pt", 3)
    args = ["add-localiser", "--model", str(graded), "--localiser", str(second)]
    ok = runner.invoke(app, [*args, "--out", str(tmp_path / "a.pt"), "--int8"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["arch"] == "r18-msc-pair-loc2-graded" and json.loads(ok.output)["dtype"] == "int8"
    missing = runner.invoke(app, [*args, "--out", str(tmp_path / "b.pt"), "--folds", "2"])
    assert missing.exit_code == 2 and "graded.folds/fold0.pt" in missing.output and "Traceback" not in missing.output
