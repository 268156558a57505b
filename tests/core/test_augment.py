"""Augmentation: deterministic under a seed, and points move with the image."""

from __future__ import annotations

import torch

from ccfnet_core.augment import AugmentConfig, apply_affine, augment_batch, random_affine


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.zeros(6, 3, 96, 96)
    points = torch.zeros(6, 11, 2)
    for i in range(6):
        x, y = 30 + 5 * i, 40 + 3 * i
        images[i, :, y - 2 : y + 2, x - 2 : x + 2] = 1.0
        points[i, :] = torch.tensor([x, y], dtype=torch.float32)
    return images, points


def test_same_seed_same_result_other_seed_other_result() -> None:
    images, points = _batch()
    spacing = torch.ones(6, 2)
    cfg = AugmentConfig()
    a = augment_batch(images, points, spacing, cfg, torch.Generator().manual_seed(3))
    b = augment_batch(images, points, spacing, cfg, torch.Generator().manual_seed(3))
    c = augment_batch(images, points, spacing, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_points_follow_the_warped_image() -> None:
    images, points = _batch()
    affine = random_affine(6, AugmentConfig(), torch.Generator().manual_seed(0), torch.device("cpu"))
    warped, moved = apply_affine(images, points, affine)
    for i in range(6):
        mask = warped[i, 0]
        if mask.max() < 0.5:
            continue  # the dot left the image
        rows, cols = torch.nonzero(mask > 0.5 * mask.max(), as_tuple=True)
        centre = torch.stack([cols.float().mean() + 0.5, rows.float().mean() + 0.5])
        assert torch.dist(centre, moved[i, 0]) < 2.5


def test_horizontal_flip_mirrors_x() -> None:
    images, points = _batch()
    cfg = AugmentConfig(p_rotation=0, p_shift=0, p_zoom=0, p_flip=1.0)
    affine = random_affine(6, cfg, torch.Generator().manual_seed(0), torch.device("cpu"))
    _, moved = apply_affine(images, points, affine)
    assert torch.allclose(moved[..., 0], 96 - points[..., 0], atol=1e-4)
    assert torch.allclose(moved[..., 1], points[..., 1], atol=1e-4)
