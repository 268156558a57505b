"""Training targets (CCFNET.md, "Targets and loss"): Gaussian heatmaps, dense offsets, class at the peak.

Built in torch for a whole batch at once so that they can be made on the GPU right after augmentation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Targets(NamedTuple):
    """Targets for a batch; the grid is h x w = input / stride.

    heatmaps, offset_y, offset_x: (N, 11, h, w). peak_index: (N, 11) flat index of the cell that holds each
    point. point_mask: (N, 11) True where the point is annotated and inside the image. class_target,
    class_mask: (N, 11), the abnormality target and where it exists.
    """

    heatmaps: Tensor
    offset_y: Tensor
    offset_x: Tensor
    peak_index: Tensor
    point_mask: Tensor
    class_target: Tensor
    class_mask: Tensor


def cell_centres(grid: int, stride: int, device: torch.device | None = None) -> Tensor:
    """Centres ((i + 0.5) * stride) of one axis of the grid, in input pixels."""
    return (torch.arange(grid, device=device, dtype=torch.float32) + 0.5) * stride


def build_targets(
    points: Tensor,
    abnormal: Tensor,
    input_size: int,
    stride: int = 16,
    sigma: float = 16.0,
) -> Targets:
    """points (N, 11, 2) as (x, y) edge coordinates of the input, NaN where missing; abnormal (N, 11) 0/1/NaN.

    Heatmap k = exp(-d^2 / (2 sigma^2)) over the cell centres, normalised so that its peak is 1. Offsets are
    (y - centre_y) / stride and (x - centre_x) / stride at every cell. Points that fall outside the input after
    augmentation are masked, like missing ones.
    """
    if points.ndim != 3 or points.shape[-1] != 2:
        raise ValueError(f"points must be (N, K, 2), got {tuple(points.shape)}")
    grid = input_size // stride
    device = points.device
    centres = cell_centres(grid, stride, device)
    x = points[..., 0]
    y = points[..., 1]
    inside = torch.isfinite(x) & torch.isfinite(y) & (x >= 0) & (x < input_size) & (y >= 0) & (y < input_size)
    x = torch.where(inside, x, torch.zeros_like(x))
    y = torch.where(inside, y, torch.zeros_like(y))

    dy = (y[..., None] - centres) / stride  # (N, K, h)
    dx = (x[..., None] - centres) / stride  # (N, K, w)
    offset_y = dy[..., :, None].expand(-1, -1, grid, grid)
    offset_x = dx[..., None, :].expand(-1, -1, grid, grid)
    d2 = (dy[..., :, None] ** 2 + dx[..., None, :] ** 2) * stride**2
    heat = torch.exp(-d2 / (2 * sigma**2))
    peak = heat.flatten(2).amax(dim=-1).clamp_min(1e-12)
    heat = heat / peak[..., None, None]
    heat = heat * inside[..., None, None]

    row = torch.clamp((y / stride).floor().long(), 0, grid - 1)
    col = torch.clamp((x / stride).floor().long(), 0, grid - 1)
    peak_index = row * grid + col
    class_mask = inside & torch.isfinite(abnormal)
    class_target = torch.where(class_mask, abnormal, torch.zeros_like(abnormal))
    return Targets(
        heatmaps=heat,
        offset_y=offset_y.contiguous(),
        offset_x=offset_x.contiguous(),
        peak_index=peak_index,
        point_mask=inside,
        class_target=class_target,
        class_mask=class_mask,
    )
