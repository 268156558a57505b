"""A second, fine stage for the grade: a small CNN reads a spine-aligned patch of the slice around each point.

Why: trained from scratch on 155 slices, the heatmap network grades at stride 16 of a 256 input (a cell is about
a fifth of a level), from features shared with localisation. A patch cut from the slice at its own resolution,
centred on the found point, rotated so that the spine runs down it and scaled to the spine's own level height, shows
the disc or vertebra itself; a small network learns the grade from it far better (docs/model.md, "Patch grader").

Geometry needs no pixel spacing: the patch side is `PATCH_LEVELS` lumbar levels, a level being measured on the
points themselves (twice the median step between neighbours along the spine), which on the Tianchi slices is the
same convention as the README's spacing estimate (36 mm per level).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ccfnet_core.structures import NUM_STRUCTURES

# Top to bottom: T12-L1, L1, L1-L2, L2, ... L5, L5-S1 (channel indices, structures.py order).
SPINAL_ORDER: Final[tuple[int, ...]] = (5, 0, 6, 1, 7, 2, 8, 3, 9, 4, 10)
PATCH_PIXELS: Final[int] = 64
PATCH_LEVELS: Final[float] = 48.0 / 36.0  # 48 mm at the README's 36 mm per level


def level_pixels(points: np.ndarray, fallback: float | None = None) -> float:
    """One lumbar level in pixels: twice the median distance between neighbours in spinal order.

    The median ignores one or two misplaced points; NaN points are skipped. With no two distinct points no scale
    can be measured: `fallback` if given (inference must answer even for a degenerate prediction), else ValueError.
    """
    ordered = np.asarray(points, dtype=np.float64)[list(SPINAL_ORDER)]
    steps = np.linalg.norm(np.diff(ordered, axis=0), axis=1)
    steps = steps[np.isfinite(steps) & (steps > 0)]
    if steps.size == 0:
        if fallback is not None:
            return fallback
        raise ValueError("the patch scale needs at least two distinct points")
    return 2.0 * float(np.median(steps))


def spine_angles(points: np.ndarray) -> np.ndarray:
    """(11,) rotation (radians) that turns the local spine axis at each point (its spinal neighbours) to vertical."""
    pts = np.asarray(points, dtype=np.float64)
    angles = np.zeros(NUM_STRUCTURES)
    last = len(SPINAL_ORDER) - 1
    for position, index in enumerate(SPINAL_ORDER):
        above = pts[SPINAL_ORDER[max(position - 1, 0)]]
        below = pts[SPINAL_ORDER[min(position + 1, last)]]
        down = below - above
        if np.isfinite(down).all() and np.hypot(*down) > 0:
            angles[index] = math.atan2(-down[0], down[1])
    return angles


@dataclass(frozen=True)
class PatchJitter:
    """Training augmentation of the patch geometry and intensity (standard deviations)."""

    shift_levels: float = 2.0 / 36.0  # 2 mm: about the localiser's median error
    rotation_deg: float = 8.0
    log_scale: float = 0.08
    log_gain: float = 0.15
    log_gamma: float = 0.15


def crop_patches(
    image: Tensor,
    points: np.ndarray,
    jitter: PatchJitter | None = None,
    rng: np.random.Generator | None = None,
    pixels: int = PATCH_PIXELS,
    levels: float = PATCH_LEVELS,
) -> Tensor:
    """(11, 1, pixels, pixels) patches of a (H, W) slice in [0, 1], one per point (x, y) in its pixels.

    Each patch is centred on its point, rotated so that the spine runs down it, `levels` levels wide (bilinear;
    zeros outside the slice). A missing point takes the slice centre (its patch has no target or is not read).
    With `jitter` (and `rng`), the geometry and the intensity are perturbed for training.
    """
    if image.ndim != 2:
        raise ValueError(f"crop_patches takes one (H, W) slice, got shape {tuple(image.shape)}")
    height, width = image.shape
    pts = np.asarray(points, dtype=np.float64)
    half = levels * level_pixels(pts, fallback=max(height, width) / 8.0) / 2.0  # a sagittal view spans ~8 levels
    angles = spine_angles(pts)
    centres = np.where(np.isfinite(pts).all(axis=1, keepdims=True), pts, [[width / 2.0, height / 2.0]])
    radii = np.full(NUM_STRUCTURES, half)
    if jitter is not None and rng is not None:
        centres = centres + rng.normal(0.0, jitter.shift_levels * 2.0 * half / levels, size=centres.shape)
        angles = angles + rng.normal(0.0, math.radians(jitter.rotation_deg), size=NUM_STRUCTURES)
        radii = radii * np.exp(rng.normal(0.0, jitter.log_scale, size=NUM_STRUCTURES))
    patches = sample_patches(image, centres, angles, radii, pixels)
    if jitter is not None and rng is not None:
        gain = math.exp(rng.normal(0.0, jitter.log_gain))
        gamma = math.exp(rng.normal(0.0, jitter.log_gamma))
        patches = patches.clamp(0, 1) ** gamma * gain
    return patches


def sample_patches(image: Tensor, centres: np.ndarray, angles: np.ndarray, radii: np.ndarray, pixels: int) -> Tensor:
    """(N, 1, pixels, pixels) square patches of a (H, W) slice (bilinear, zeros outside it).

    Patch coordinates (u, v) in [-1, 1] (u across, v down the patch) sit at slice pixel
    centre + radius * R(angle) (u, v): `patch_offset_to_pixels` maps such an offset back.
    """
    height, width = image.shape
    thetas = []
    for (x, y), angle, radius in zip(centres, angles, radii, strict=True):
        cos, sin = math.cos(float(angle)), math.sin(float(angle))
        thetas.append(
            [
                [radius * cos * 2 / width, -radius * sin * 2 / width, 2 * x / width - 1],
                [radius * sin * 2 / height, radius * cos * 2 / height, 2 * y / height - 1],
            ]
        )
    theta = torch.tensor(thetas, dtype=image.dtype, device=image.device)
    grid = F.affine_grid(theta, [len(thetas), 1, pixels, pixels], align_corners=False)
    source = image[None, None].expand(len(thetas), 1, height, width)
    return F.grid_sample(source, grid, align_corners=False, padding_mode="zeros")


def patch_offset_to_pixels(offsets: np.ndarray, angles: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """(N, 2) patch-frame offsets (u, v) -> (N, 2) slice-pixel offsets (dx, dy): radius * R(angle) (u, v)."""
    cos, sin = np.cos(angles), np.sin(angles)
    u, v = offsets[:, 0], offsets[:, 1]
    return np.stack([cos * u - sin * v, sin * u + cos * v], axis=1) * radii[:, None]


def _conv_pair(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, 3, padding=1, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
        nn.Conv2d(outputs, outputs, 3, padding=1, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
    )


class PatchGrader(nn.Module):
    """Patch (N, 1, 64, 64) + structure index (N,) -> abnormality logit (N,); a VGG-style CNN of 1.2 M parameters.

    The structure index enters as a learnt embedding beside the pooled features, so one network serves the
    11 levels and still knows their different base rates. With `classes` > 1 it gives (N, classes) class logits
    instead (the disc grade, `ccfnet_core.disc_grades`).
    """

    def __init__(self, width: int = 32, embedding: int = 16, classes: int = 1):
        super().__init__()
        if classes < 1:
            raise ValueError(f"a grader has at least one output, not {classes}")
        self.classes = classes
        self.features = nn.Sequential(
            _conv_pair(1, width),
            nn.MaxPool2d(2),
            _conv_pair(width, 2 * width),
            nn.MaxPool2d(2),
            _conv_pair(2 * width, 4 * width),
            nn.MaxPool2d(2),
            _conv_pair(4 * width, 8 * width),
            nn.AdaptiveAvgPool2d(1),
        )
        self.structure = nn.Embedding(NUM_STRUCTURES, embedding)
        self.head = nn.Sequential(
            nn.Linear(8 * width + embedding, 64), nn.ReLU(inplace=True), nn.Dropout(0.3), nn.Linear(64, classes)
        )

    def forward(self, patches: Tensor, structures: Tensor) -> Tensor:
        pooled = self.features(patches).flatten(1)
        logits: Tensor = self.head(torch.cat([pooled, self.structure(structures)], dim=1))
        return logits.squeeze(1) if self.classes == 1 else logits

    def grade(self, image: Tensor, points: np.ndarray, flip: bool = True, only: Sequence[int] | None = None) -> Tensor:
        """(11,) logits ((11, classes) with several classes) for the 11 points of one (H, W) slice; with `flip`,
        averaged with the front-back mirror. `only` grades those structures alone (rows in that order)."""
        patches = crop_patches(image, points)
        structures = torch.arange(NUM_STRUCTURES, device=image.device)
        if only is not None:
            patches, structures = patches[list(only)], structures[list(only)]
        logits = self(patches, structures)
        if flip:
            logits = (logits + self(torch.flip(patches, dims=[-1]), structures)) / 2
        return logits
