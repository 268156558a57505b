"""CCF-Net loss (CCFNET.md): heatmap MSE + offset SmoothL1 near the points + class-balanced BCE at the peak.

Every term masks missing points (the reference code does not), so a study with 10 labelled points teaches
the other 10 without pulling the 11th heatmap to zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ccfnet_core.model import split_output
from ccfnet_core.structures import DISC_INDICES, VERTEBRA_INDICES
from ccfnet_core.targets import Targets


@dataclass(frozen=True)
class LossWeights:
    heatmap: float = 1.0
    offset_y: float = 2.0
    offset_x: float = 2.0
    vertebra_class: float = 0.001
    disc_class: float = 0.001
    offset_threshold: float = 0.4


def class_balanced_weight(count: int) -> float:
    """Cui et al. 2019 with b = (n - 1) / n: E = (1 - b^n) / (1 - b), w = 1 / E (CCFNET.md)."""
    if count <= 0:
        return 0.0
    if count == 1:
        return 1.0
    beta = (count - 1) / count
    effective = (1 - beta**count) / (1 - beta)
    return 1.0 / effective


def pos_weight(positives: int, negatives: int) -> float:
    """BCE pos_weight = w_pos / w_neg from class-balanced weights; 1 when either class is absent."""
    if positives == 0 or negatives == 0:
        return 1.0
    return class_balanced_weight(positives) / class_balanced_weight(negatives)


@dataclass(frozen=True)
class LossParts:
    total: Tensor
    heatmap: Tensor
    offset_y: Tensor
    offset_x: Tensor
    vertebra_class: Tensor
    disc_class: Tensor

    def as_floats(self) -> dict[str, float]:
        return {name: float(getattr(self, name).detach()) for name in self.__dataclass_fields__}


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    weight = mask.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def _peak_logits(logits: Tensor, peak_index: Tensor) -> Tensor:
    return logits.flatten(2).gather(2, peak_index[..., None]).squeeze(-1)


def _class_term(
    logits_at_peak: Tensor, targets: Targets, channels: Sequence[int], pos_weight_value: float
) -> Tensor:
    idx = list(channels)
    mask = targets.class_mask[:, idx]
    if not bool(mask.any()):
        return logits_at_peak.sum() * 0.0
    weight = torch.tensor(pos_weight_value, dtype=logits_at_peak.dtype, device=logits_at_peak.device)
    per_point = F.binary_cross_entropy_with_logits(
        logits_at_peak[:, idx], targets.class_target[:, idx], pos_weight=weight, reduction="none"
    )
    return _masked_mean(per_point, mask)


def ccfnet_loss(
    output: Tensor,
    targets: Targets,
    weights: LossWeights = LossWeights(),
    vertebra_pos_weight: float = 1.0,
    disc_pos_weight: float = 1.0,
) -> LossParts:
    """output (N, 44, h, w) from the network; targets from `build_targets` at the same grid."""
    heat, off_y, off_x, logits = split_output(output.float())
    point_mask = targets.point_mask[..., None, None].expand_as(heat)
    heat_loss = _masked_mean((heat - targets.heatmaps) ** 2, point_mask)

    near = point_mask & (targets.heatmaps >= weights.offset_threshold)
    off_y_loss = _masked_mean(F.smooth_l1_loss(off_y, targets.offset_y, reduction="none"), near)
    off_x_loss = _masked_mean(F.smooth_l1_loss(off_x, targets.offset_x, reduction="none"), near)

    at_peak = _peak_logits(logits, targets.peak_index)
    vert_loss = _class_term(at_peak, targets, VERTEBRA_INDICES, vertebra_pos_weight)
    disc_loss = _class_term(at_peak, targets, DISC_INDICES, disc_pos_weight)

    total = (
        weights.heatmap * heat_loss
        + weights.offset_y * off_y_loss
        + weights.offset_x * off_x_loss
        + weights.vertebra_class * vert_loss
        + weights.disc_class * disc_loss
    )
    return LossParts(total, heat_loss, off_y_loss, off_x_loss, vert_loss, disc_loss)
