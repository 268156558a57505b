"""A fine stage for the points: a small CNN moves each found point to where its structure is in a patch around it.

Why: the heatmap network decodes a point from one stride-16 cell of a 256 input and its offset; out of fold about a
quarter of its misses are near misses, 6-9 mm from the annotated point, on the right structure (docs/model.md,
"Point refiner"). A patch of the slice at its own resolution, centred on the found point and turned along the spine
(the grader's geometry, `ccfnet_core.grader`), shows the structure itself; a network trained to find it there from
points displaced as the localiser displaces them pulls those points in. It cannot fix a point on the wrong level:
the patch then shows the neighbouring structure, which looks the same.

The network is fully convolutional up to a 16 x 16 map, soft-argmax over it (integral regression), so position is
kept rather than pooled away; a learnt structure embedding is added to the features, as in the grader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import numpy as np
import torch
from torch import Tensor, nn

from ccfnet_core.grader import (
    PATCH_LEVELS,
    PATCH_PIXELS,
    level_pixels,
    patch_offset_to_pixels,
    sample_patches,
    spine_angles,
)
from ccfnet_core.structures import NUM_STRUCTURES

MM_PER_LEVEL: Final[float] = 36.0  # the README's spacing convention: 36 mm centre to centre per lumbar level


@dataclass(frozen=True)
class RefinerJitter:
    """How training displaces the true points (mm, per axis) and perturbs the patch (standard deviations)."""

    shift_mm: float = 4.0
    max_shift_mm: float = 14.0  # under half the disc-to-vertebra distance (18 mm): the nearest structure is the target
    rotation_deg: float = 8.0
    log_scale: float = 0.08
    log_gain: float = 0.15
    log_gamma: float = 0.15


def _pair(inputs: int, outputs: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, 3, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
        nn.Conv2d(outputs, outputs, 3, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
    )


class PointRefiner(nn.Module):
    """Patch (N, 1, 64, 64) + structure index (N,) -> where the structure is, (N, 2) as (u, v) in [-1, 1].

    Three stages to a 16 x 16 map (64 channels), two dilated stages for context over the whole patch, one logit
    per cell, softmax over the cells and the expected cell centre. 0.2 M parameters.
    """

    def __init__(self, width: int = 16, embedding: int = 16):
        super().__init__()
        self.stem = nn.Sequential(
            _pair(1, width), nn.MaxPool2d(2), _pair(width, 2 * width), nn.MaxPool2d(2), _pair(2 * width, 4 * width)
        )
        self.structure = nn.Embedding(NUM_STRUCTURES, embedding)
        self.condition = nn.Linear(embedding, 4 * width)
        self.context = nn.Sequential(_pair(4 * width, 4 * width, dilation=2), _pair(4 * width, 4 * width, dilation=4))
        self.logit = nn.Conv2d(4 * width, 1, 1)

    def forward(self, patches: Tensor, structures: Tensor) -> Tensor:
        features = self.stem(patches) + self.condition(self.structure(structures))[:, :, None, None]
        logits = self.logit(self.context(features))  # (N, 1, h, w)
        n, _, h, w = logits.shape
        weights = logits.flatten(1).softmax(dim=1).reshape(n, h, w)
        v_cells = (torch.arange(h, device=logits.device, dtype=weights.dtype) + 0.5) * 2 / h - 1
        u_cells = (torch.arange(w, device=logits.device, dtype=weights.dtype) + 0.5) * 2 / w - 1
        u = (weights.sum(dim=1) * u_cells).sum(dim=1)
        v = (weights.sum(dim=2) * v_cells).sum(dim=1)
        return torch.stack([u, v], dim=1)

    def refine(self, image: Tensor, points: np.ndarray, flip: bool = True) -> np.ndarray:
        """(11, 2) refined points (x, y) of one (H, W) slice; with `flip`, averaged with the front-back mirror.

        Missing (NaN) points stay missing. The patch frame comes from the points themselves, as the grader's.
        """
        pts = np.asarray(points, dtype=np.float64)
        present = np.asarray(np.isfinite(pts).all(axis=1))
        if present.sum() < 2:
            return pts.copy()
        height, width = image.shape
        radii = np.full(NUM_STRUCTURES, PATCH_LEVELS * level_pixels(pts) / 2.0)
        angles = spine_angles(pts)
        centres = np.where(present[:, None], pts, [[width / 2.0, height / 2.0]])
        patches = sample_patches(image, centres, angles, radii, PATCH_PIXELS)
        structures = torch.arange(NUM_STRUCTURES, device=image.device)
        with torch.no_grad():
            offsets = self(patches, structures)
            if flip:
                mirrored = self(torch.flip(patches, dims=[-1]), structures)
                offsets = (offsets + mirrored * torch.tensor([-1.0, 1.0], device=image.device)) / 2
        moved = centres + patch_offset_to_pixels(offsets.double().cpu().numpy(), angles, radii)
        return np.where(present[:, None], moved, np.nan)


def training_patches(
    image: Tensor, points: np.ndarray, jitter: RefinerJitter, rng: np.random.Generator
) -> tuple[Tensor, Tensor, np.ndarray]:
    """Patches around displaced true points of one slice, the true points in patch coordinates, which are present.

    The patch frame (scale, axis) is the true points', perturbed; the displacement is Gaussian per axis, clipped
    to `max_shift_mm`, in mm at 36 mm per level (the spacing convention), so no pixel spacing is needed.
    """
    pts = np.asarray(points, dtype=np.float64)
    present = np.asarray(np.isfinite(pts).all(axis=1))
    height, width = image.shape
    level = level_pixels(pts)
    pixels_per_mm = level / MM_PER_LEVEL
    shift = rng.normal(0.0, jitter.shift_mm, size=(NUM_STRUCTURES, 2))
    length = np.linalg.norm(shift, axis=1, keepdims=True)
    shift = np.where(length > jitter.max_shift_mm, shift * jitter.max_shift_mm / np.maximum(length, 1e-9), shift)
    truth = np.where(present[:, None], pts, [[width / 2.0, height / 2.0]])
    centres = truth + shift * pixels_per_mm
    angles = spine_angles(pts) + rng.normal(0.0, math.radians(jitter.rotation_deg), size=NUM_STRUCTURES)
    radii = PATCH_LEVELS * level / 2.0 * np.exp(rng.normal(0.0, jitter.log_scale, size=NUM_STRUCTURES))
    patches = sample_patches(image, centres, angles, radii, PATCH_PIXELS)
    gain = math.exp(rng.normal(0.0, jitter.log_gain))
    gamma = math.exp(rng.normal(0.0, jitter.log_gamma))
    patches = patches.clamp(0, 1) ** gamma * gain
    delta = truth - centres
    cos, sin = np.cos(angles), np.sin(angles)
    in_patch = np.stack([cos * delta[:, 0] + sin * delta[:, 1], -sin * delta[:, 0] + cos * delta[:, 1]], axis=1)
    return patches, torch.from_numpy(in_patch / radii[:, None]).float(), present
