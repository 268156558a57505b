"""Augmentation as in CCFNET.md, on whole batches in torch (so it runs on the GPU when training does).

Geometric transforms share one affine per sample, applied to the image with grid_sample and to the points
with the same matrix. Every draw comes from the `torch.Generator` passed in, so a seed fixes the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges and probabilities; each transform is drawn independently per sample."""

    rotation_deg: float = 45.0
    p_rotation: float = 0.8
    shift_y: float = 0.2
    shift_x: float = 0.3
    p_shift: float = 0.8
    zoom_y: float = 0.2
    zoom_x: float = 0.3
    p_zoom: float = 0.8
    p_flip: float = 0.5
    intensity: float = 0.3
    p_intensity: float = 0.8
    bias_coefficient: float = 0.5
    p_bias: float = 0.8
    p_slice_jitter: float = 0.5
    label_jitter_mm: float = 1.5

    def scaled(self, strength: float) -> AugmentConfig:
        """The same recipe with every range multiplied by `strength` (probabilities unchanged)."""
        return AugmentConfig(
            rotation_deg=self.rotation_deg * strength,
            p_rotation=self.p_rotation,
            shift_y=self.shift_y * strength,
            shift_x=self.shift_x * strength,
            p_shift=self.p_shift,
            zoom_y=self.zoom_y * strength,
            zoom_x=self.zoom_x * strength,
            p_zoom=self.p_zoom,
            p_flip=self.p_flip,
            intensity=self.intensity * strength,
            p_intensity=self.p_intensity,
            bias_coefficient=self.bias_coefficient * strength,
            p_bias=self.p_bias,
            p_slice_jitter=self.p_slice_jitter,
            label_jitter_mm=self.label_jitter_mm,
        )


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


def _gate(n: int, p: float, gen: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(n, generator=gen, device=device) < p


def random_affine(n: int, cfg: AugmentConfig, gen: torch.Generator, device: torch.device) -> Tensor:
    """(n, 2, 3) forward affines in normalised coordinates ([-1, 1], centre 0): out = A @ in + t."""
    angle = torch.where(
        _gate(n, cfg.p_rotation, gen, device),
        _uniform(n, -cfg.rotation_deg, cfg.rotation_deg, gen, device) * math.pi / 180,
        torch.zeros(n, device=device),
    )
    zoom_on = _gate(n, cfg.p_zoom, gen, device)
    zx = torch.where(zoom_on, _uniform(n, 1 - cfg.zoom_x, 1 + cfg.zoom_x, gen, device), torch.ones(n, device=device))
    zy = torch.where(zoom_on, _uniform(n, 1 - cfg.zoom_y, 1 + cfg.zoom_y, gen, device), torch.ones(n, device=device))
    flip = torch.where(_gate(n, cfg.p_flip, gen, device), -torch.ones(n, device=device), torch.ones(n, device=device))
    shift_on = _gate(n, cfg.p_shift, gen, device)
    tx = torch.where(shift_on, _uniform(n, -cfg.shift_x, cfg.shift_x, gen, device) * 2, torch.zeros(n, device=device))
    ty = torch.where(shift_on, _uniform(n, -cfg.shift_y, cfg.shift_y, gen, device) * 2, torch.zeros(n, device=device))
    cos, sin = torch.cos(angle), torch.sin(angle)
    # A = R(angle) @ diag(zx * flip, zy)
    a = torch.stack(
        [
            torch.stack([cos * zx * flip, -sin * zy, tx], dim=-1),
            torch.stack([sin * zx * flip, cos * zy, ty], dim=-1),
        ],
        dim=1,
    )
    return a


def apply_affine(images: Tensor, points: Tensor, affine: Tensor) -> tuple[Tensor, Tensor]:
    """Warp (N, C, S, S) images and (N, K, 2) edge-coordinate points by forward affines (N, 2, 3)."""
    size = images.shape[-1]
    linear, shift = affine[:, :, :2], affine[:, :, 2]
    inverse = torch.linalg.inv(linear)
    theta = torch.cat([inverse, -(inverse @ shift[..., None])], dim=2)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    normalised = points / size * 2 - 1
    moved = torch.einsum("nij,nkj->nki", linear, normalised) + shift[:, None, :]
    return warped, (moved + 1) / 2 * size


def bias_field(n: int, size: int, coefficient: float, gen: torch.Generator, device: torch.device) -> Tensor:
    """Multiplicative field exp(sum c_ij x^i y^j), i + j <= 3, coefficients uniform in +-coefficient."""
    axis = torch.linspace(-1, 1, size, device=device)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    terms = [xx**i * yy**j for i in range(4) for j in range(4 - i)]
    basis = torch.stack(terms)  # (T, S, S)
    coeffs = _uniform(n * len(terms), -coefficient, coefficient, gen, device).reshape(n, len(terms))
    return torch.exp(torch.einsum("nt,tyx->nyx", coeffs, basis))[:, None]


def jitter_slices(images: Tensor, p: float, gen: torch.Generator) -> Tensor:
    """Shift the (i-1, i, i+1) window by one slice, repeating the edge (only 3 slices are kept)."""
    n = images.shape[0]
    device = images.device
    on = _gate(n, p, gen, device)
    up = torch.rand(n, generator=gen, device=device) < 0.5
    forward = images[:, [1, 2, 2]]
    backward = images[:, [0, 0, 1]]
    shifted = torch.where(up[:, None, None, None], forward, backward)
    return torch.where(on[:, None, None, None], shifted, images)


def augment_batch(
    images: Tensor,
    points: Tensor,
    mm_per_pixel: Tensor,
    cfg: AugmentConfig,
    gen: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """images (N, 3, S, S) in [0, 1]; points (N, 11, 2) edge coordinates (NaN missing); mm_per_pixel (N, 2) as
    (x, y). Returns augmented copies; points that leave the image are left for `build_targets` to mask."""
    n, _, size, _ = images.shape
    device = images.device
    images = jitter_slices(images, cfg.p_slice_jitter, gen)
    if cfg.label_jitter_mm > 0:
        noise = _uniform(n * points.shape[1] * 2, -1, 1, gen, device).reshape(points.shape)
        points = points + noise * cfg.label_jitter_mm / mm_per_pixel[:, None, :]
    images, points = apply_affine(images, points, random_affine(n, cfg, gen, device))
    scale = torch.where(
        _gate(n, cfg.p_intensity, gen, device),
        _uniform(n, 1 - cfg.intensity, 1 + cfg.intensity, gen, device),
        torch.ones(n, device=device),
    )
    images = images * scale[:, None, None, None]
    field = bias_field(n, size, cfg.bias_coefficient, gen, device)
    use_field = _gate(n, cfg.p_bias, gen, device)[:, None, None, None]
    images = torch.where(use_field, images * field, images)
    return images.clamp_min(0.0), points
