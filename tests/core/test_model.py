"""The network is the paper's: parameter and MAC counts, registry, and a forward/backward contract."""

from __future__ import annotations

import pytest
import torch

from ccfnet_core.grader import PatchGrader
from ccfnet_core.model import (
    DISC_GRADE_CLASSES,
    GRADED_SUFFIX,
    GRADES_SUFFIX,
    REFINED_SUFFIX,
    ContextBlock,
    GradedCCFNet,
    RefinedCCFNet,
    count_macs,
    count_parameters,
    create_model,
    list_models,
    register_model,
    split_output,
)
from ccfnet_core.refiner import PointRefiner

# Paper (thop) figures at 1x3x512x512; R18/R50 plain from our count (the published table swaps R18's columns).
EXPECTED = {
    "r18-msc": (4.83, 12.00),
    "r50-msc": (10.79, 22.09),
    "r18": (11.20, 9.51),
    "r50": (23.60, 21.49),
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_parameters_and_macs_match_the_paper(arch: str) -> None:
    model = create_model(arch)
    params_m, macs_g = EXPECTED[arch]
    assert round(count_parameters(model) / 1e6, 2) == params_m
    assert round(count_macs(model, 512) / 1e9, 2) == macs_g


def test_reusing_context_branches_changes_cost_not_output() -> None:
    torch.manual_seed(0)
    model = create_model("r18-msc").eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=0.05)
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        shared = model(x)
        for module in model.modules():
            if isinstance(module, ContextBlock):
                module.reuse_branches = False
        literal = model(x)
    assert torch.allclose(shared, literal, atol=1e-5)
    assert count_macs(model, 512, paper_graph=False) < count_macs(model, 512, paper_graph=True) - 1.8e9


@pytest.mark.parametrize(
    "arch", [name for name in list_models() if GRADED_SUFFIX not in name and REFINED_SUFFIX not in name]
)
def test_every_registered_model_runs_forward_and_backward(arch: str) -> None:
    model = create_model(arch).train()
    x = torch.rand(2, 3, 128, 128)
    out = model(x)
    grid = 128 // model.stride
    assert out.shape == (2, 44, grid, grid)
    assert torch.isfinite(out).all()
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    heat, off_y, off_x, logits = split_output(out)
    assert heat.shape[1] == off_y.shape[1] == off_x.shape[1] == logits.shape[1] == 11


@pytest.mark.parametrize(
    "arch", [name for name in list_models() if GRADED_SUFFIX in name and REFINED_SUFFIX not in name]
)
def test_every_graded_model_is_its_registered_network_and_its_graders(arch: str) -> None:
    """The forward of a graded model is its network's (tested above); the graders (and a disc grade grader, for
    `-grades`) run after decoding."""
    base, _, count = arch.partition(GRADED_SUFFIX)
    grades = count.endswith(GRADES_SUFFIX)
    count = count.removesuffix(GRADES_SUFFIX)
    model = create_model(arch)
    assert isinstance(model, GradedCCFNet) and len(model.graders) == int(count or 1)
    assert (model.grade_grader is not None) == grades
    grader_parameters = count_parameters(PatchGrader())
    extra = count_parameters(PatchGrader(classes=DISC_GRADE_CLASSES)) if grades else 0
    expected = count_parameters(create_model(base)) + len(model.graders) * grader_parameters + extra
    assert count_parameters(model) == expected


@pytest.mark.parametrize("arch", [name for name in list_models() if REFINED_SUFFIX in name])
def test_every_refined_model_is_its_registered_network_and_its_refiners(arch: str) -> None:
    """The forward of a refined model is its network's (tested above); the refiners run after decoding."""
    base, _, count = arch.partition(REFINED_SUFFIX)
    model = create_model(arch)
    assert isinstance(model, RefinedCCFNet) and len(model.refiners) == int(count or 1)
    refiner_parameters = count_parameters(PointRefiner())
    assert count_parameters(model) == count_parameters(create_model(base)) + len(model.refiners) * refiner_parameters


def test_a_point_refiner_runs_forward_and_backward() -> None:
    refiner = PointRefiner().train()
    out = refiner(torch.rand(4, 1, 64, 64), torch.arange(4))
    assert out.shape == (4, 2) and (out.abs() <= 1).all()
    out.pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in refiner.parameters())


@pytest.mark.parametrize("classes", [1, DISC_GRADE_CLASSES])
def test_a_patch_grader_runs_forward_and_backward(classes: int) -> None:
    grader = PatchGrader(classes=classes).train()
    logits = grader(torch.rand(6, 1, 64, 64), torch.arange(6))
    assert logits.shape == ((6,) if classes == 1 else (6, classes))
    logits.pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in grader.parameters())


def test_registry_refuses_duplicates_and_names_unknown_architectures() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("r18-msc")(lambda: create_model("r18"))
    with pytest.raises(ValueError, match="unknown architecture 'r34'"):
        create_model("r34")
