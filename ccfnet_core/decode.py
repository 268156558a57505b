"""Decoding with flip test-time augmentation (CCFNET.md, "Inference")."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ccfnet_core.model import split_output


def forward_tta(model: nn.Module, images: Tensor, flip: bool = True) -> Tensor:
    """Forward (N, 3, S, S); with `flip`, average heatmaps and logits with the flipped pass (flipped back).

    Offsets come from the unflipped pass only: a flipped x-offset would need its sign changed and its cell
    moved, and the paper keeps the unflipped ones.
    """
    output: Tensor = model(images)
    if not flip:
        return output
    flipped: Tensor = model(torch.flip(images, dims=[-1])).flip(dims=[-1])
    heat, off_y, off_x, logits = split_output(output)
    heat_f, _, _, logits_f = split_output(flipped)
    return torch.cat([(heat + heat_f) / 2, off_y, off_x, (logits + logits_f) / 2], dim=1)


def decode(output: Tensor, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, 44, h, w) -> points (N, 11, 2) as (x, y) edge coordinates of the input, P(abnormal) (N, 11), peak (N, 11).

    Per channel: the argmax cell, then point = ((col + off_x + 0.5) * stride, (row + off_y + 0.5) * stride);
    probability = sigmoid(logit at that cell).
    """
    heat, off_y, off_x, logits = split_output(output.float())
    n, k, h, w = heat.shape
    flat = heat.reshape(n, k, h * w)
    peak_value, peak_index = flat.max(dim=-1)
    row = torch.div(peak_index, w, rounding_mode="floor")
    col = peak_index % w

    def at_peak(maps: Tensor) -> Tensor:
        return maps.reshape(n, k, h * w).gather(2, peak_index[..., None]).squeeze(-1)

    x = (col.float() + at_peak(off_x) + 0.5) * stride
    y = (row.float() + at_peak(off_y) + 0.5) * stride
    prob = torch.sigmoid(at_peak(logits))
    points = torch.stack([x, y], dim=-1)
    return points.cpu().numpy().astype(np.float64), prob.cpu().numpy().astype(np.float64), (
        peak_value.cpu().numpy().astype(np.float64)
    )
