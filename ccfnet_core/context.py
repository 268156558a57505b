"""Study context for the grade: each structure's abnormality logit read together with the rest of the study.

Why: the network grades each structure from the cells around it, but degeneration is a property of the spine as
much as of one level: a study whose discs are degenerated usually has degenerated vertebrae too. Re-reading each
logit beside the study's mean vertebra logit, mean disc logit and its anatomical neighbours' logits (a logistic
regression per structure type, five weights each) raised the out-of-fold vertebra AUC by 3-10 points per fold
(docs/model.md). The weights are fitted on out-of-fold logits only (`ccfnet_core.pair.fit_pair_context`), so a
fold model's weights never saw its own held-out studies. Localisation is untouched.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ccfnet_core.structures import NUM_STRUCTURES, VERTEBRAE

CONTEXT_FEATURES = ("own logit", "study mean vertebra logit", "study mean disc logit", "neighbours' mean logit", "1")
CONTEXT_TYPES = ("vertebra", "disc")
# L2 on the four slopes (not the intercept), in units of the mean binary cross-entropy; chosen on folds 0-1.
CONTEXT_L2 = 0.1
_VERTEBRAE = len(VERTEBRAE)


def _neighbours(index: int) -> list[int]:
    """Anatomical neighbours: a vertebra's discs above and below; a disc's vertebrae above and below (if any)."""
    if index < _VERTEBRAE:
        return [_VERTEBRAE + index, _VERTEBRAE + index + 1]
    disc = index - _VERTEBRAE  # 0 = T12-L1 (only L1 below), 5 = L5-S1 (only L5 above)
    return [v for v in (disc - 1, disc) if 0 <= v < _VERTEBRAE]


NEIGHBOURS = tuple(_neighbours(k) for k in range(NUM_STRUCTURES))


def context_features(logits: Tensor) -> Tensor:
    """(N, 11) logits -> (N, 11, 5) features in CONTEXT_FEATURES order."""
    vertebra_mean = logits[:, :_VERTEBRAE].mean(dim=1, keepdim=True).expand_as(logits)
    disc_mean = logits[:, _VERTEBRAE:].mean(dim=1, keepdim=True).expand_as(logits)
    neighbours = torch.stack([logits[:, list(nb)].mean(dim=1) for nb in NEIGHBOURS], dim=1)
    return torch.stack([logits, vertebra_mean, disc_mean, neighbours, torch.ones_like(logits)], dim=-1)


def identity_weights() -> Tensor:
    """(2, 5) weights that return each logit unchanged."""
    weights = torch.zeros(len(CONTEXT_TYPES), len(CONTEXT_FEATURES))
    weights[:, 0] = 1.0
    return weights


class StudyContext(nn.Module):
    """(N, 11) logits at the points -> (N, 11) logits in study context; identity until fitted.

    The weights are a buffer, so they are saved with the network's weights and covered by their digest.
    """

    weights: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weights", identity_weights())

    def forward(self, logits: Tensor) -> Tensor:
        features = context_features(logits.to(self.weights.dtype))
        per_structure = self.weights[[0 if k < _VERTEBRAE else 1 for k in range(NUM_STRUCTURES)]]  # (11, 5)
        return (features * per_structure).sum(dim=-1)

    @property
    def is_identity(self) -> bool:
        return bool(torch.equal(self.weights.cpu(), identity_weights()))


def fit_context(logits: np.ndarray, targets: np.ndarray, l2: float = CONTEXT_L2) -> Tensor:
    """Logistic regression per structure type on (studies, 11) logits and targets (1, 0, NaN = none) -> (2, 5).

    Raises ValueError if a type lacks either class (the regression would be undefined).
    """
    features = context_features(torch.from_numpy(np.asarray(logits, dtype=np.float64)))
    target = torch.from_numpy(np.asarray(targets, dtype=np.float64))
    weights = torch.zeros(len(CONTEXT_TYPES), len(CONTEXT_FEATURES), dtype=torch.float64)
    for t, columns in enumerate((slice(0, _VERTEBRAE), slice(_VERTEBRAE, NUM_STRUCTURES))):
        x = features[:, columns].reshape(-1, len(CONTEXT_FEATURES))
        y = target[:, columns].reshape(-1)
        known = torch.isfinite(y) & torch.isfinite(x).all(dim=1)
        x, y = x[known], y[known]
        if y.numel() == 0 or y.min() == y.max():
            raise ValueError(f"fitting the {CONTEXT_TYPES[t]} context needs both normal and abnormal targets")
        weights[t] = _logistic_regression(x, y, l2)
    return weights.float()


def _logistic_regression(x: Tensor, y: Tensor, l2: float) -> Tensor:
    """Weights minimising mean BCE + l2 * |slopes|^2 (the last column is the intercept, not penalised)."""
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimiser.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(x @ w, y) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return w.detach()
