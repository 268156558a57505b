"""Study context: each logit re-read beside the study's other logits by a logistic regression per type."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ccfnet_core.context import NEIGHBOURS, StudyContext, context_features, fit_context
from ccfnet_core.metrics import roc_auc
from ccfnet_core.structures import STRUCTURES


def test_neighbours_are_the_adjacent_structures_of_the_other_type() -> None:
    named = {STRUCTURES[k]: [STRUCTURES[j] for j in nb] for k, nb in enumerate(NEIGHBOURS)}
    assert named["L1"] == ["T12-L1", "L1-L2"] and named["L5"] == ["L4-L5", "L5-S1"]
    assert named["T12-L1"] == ["L1"] and named["L3-L4"] == ["L3", "L4"] and named["L5-S1"] == ["L5"]


def test_an_unfitted_context_returns_the_logits_unchanged() -> None:
    logits = torch.randn(4, 11)
    context = StudyContext()
    assert context.is_identity
    assert torch.equal(context(logits), logits)
    features = context_features(logits)
    torch.testing.assert_close(features[:, 0, 1], logits[:, :5].mean(dim=1))
    torch.testing.assert_close(features[:, 0, 2], logits[:, 5:].mean(dim=1))
    torch.testing.assert_close(features[:, 5, 3], logits[:, 0])  # T12-L1: L1 only


def test_the_fit_finds_a_grade_that_lives_in_the_study_not_in_the_own_logit() -> None:
    """Vertebra grades follow a per-study factor that only the disc logits carry: the fit must use it."""
    rng = np.random.default_rng(0)
    studies = 300
    factor = rng.normal(size=studies)
    logits = np.empty((studies, 11))
    logits[:, :5] = rng.normal(size=(studies, 5))  # vertebra logits: noise
    logits[:, 5:] = factor[:, None] + 0.5 * rng.normal(size=(studies, 6))
    targets = np.empty((studies, 11))
    targets[:, :5] = (factor[:, None] + 0.3 * rng.normal(size=(studies, 5)) > -0.5).astype(float)
    targets[:, 5:] = (logits[:, 5:] + 0.3 * rng.normal(size=(studies, 6)) > 0).astype(float)
    targets[0, 0] = np.nan  # no target there: ignored

    weights = fit_context(logits, targets)
    own, vertebra_mean, disc_mean, neighbours = (float(w) for w in weights[0, :4])
    assert disc_mean > 0.4 and neighbours > 0.4  # a vertebra's neighbours are discs: both carry the factor
    assert abs(own) < 0.1 and abs(vertebra_mean) < 0.1
    context = StudyContext()
    context.weights.copy_(weights)
    read = context(torch.from_numpy(logits).float()).numpy()
    known = np.isfinite(targets[:, :5])
    assert roc_auc(targets[:, :5][known], read[:, :5][known]) > 0.85
    assert roc_auc(targets[:, :5][known], logits[:, :5][known]) < 0.6


def test_a_type_without_both_classes_is_refused_by_name() -> None:
    logits = np.zeros((3, 11))
    targets = np.ones((3, 11))
    targets[0, 5:] = 0.0
    with pytest.raises(ValueError, match="vertebra context needs both"):
        fit_context(logits, targets)
