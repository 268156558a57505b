"""Targets, loss and decoding as CCFNET.md states them, including masking of missing points."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ccfnet_core.decode import decode, forward_tta
from ccfnet_core.loss import ccfnet_loss, class_balanced_weight, pos_weight
from ccfnet_core.targets import build_targets

SIZE, STRIDE, SIGMA = 512, 16, 16.0


def _points() -> torch.Tensor:
    xs = torch.linspace(200, 260, 11)
    ys = torch.linspace(90, 430, 11)
    return torch.stack([xs, ys], dim=-1)[None] + torch.rand(1, 11, 2) * 7


def test_heatmap_peak_is_one_at_the_points_cell_and_gaussian_elsewhere() -> None:
    points = _points()
    t = build_targets(points, torch.zeros(1, 11), SIZE, STRIDE, SIGMA)
    grid = SIZE // STRIDE
    for k in range(11):
        x, y = points[0, k].tolist()
        row, col = int(y // STRIDE), int(x // STRIDE)
        heat = t.heatmaps[0, k]
        assert heat.max().item() == pytest.approx(1.0)
        assert divmod(int(heat.argmax()), grid) == (row, col)
        cy, cx = (row + 0.5) * STRIDE, (col + 0.5) * STRIDE
        d2 = ((y - cy) ** 2 + (x - cx) ** 2) - ((y - (cy + STRIDE)) ** 2 + (x - cx) ** 2)
        ratio = heat[row + 1, col] / heat[row, col]
        assert ratio.item() == pytest.approx(math.exp(d2 / (2 * SIGMA**2)), rel=1e-4)


def test_offsets_from_any_cell_point_back_to_the_point() -> None:
    points = _points()
    t = build_targets(points, torch.zeros(1, 11), SIZE, STRIDE, SIGMA)
    centres = (torch.arange(SIZE // STRIDE) + 0.5) * STRIDE
    y_back = centres[:, None] + t.offset_y[0, 3] * STRIDE
    x_back = centres[None, :] + t.offset_x[0, 3] * STRIDE
    assert torch.allclose(y_back, points[0, 3, 1].expand_as(y_back), atol=1e-3)
    assert torch.allclose(x_back, points[0, 3, 0].expand_as(x_back), atol=1e-3)


def test_decoding_perfect_maps_recovers_points_and_probabilities() -> None:
    points = _points()
    abnormal = torch.tensor([[1, 0, 1, 0, 0, 1, 1, 0, 0, 1, 0]], dtype=torch.float32)
    t = build_targets(points, abnormal, SIZE, STRIDE, SIGMA)
    logits = (abnormal * 8 - 4)[..., None, None].expand_as(t.heatmaps)
    output = torch.cat([t.heatmaps, t.offset_y, t.offset_x, logits], dim=1)
    decoded, probs, peaks = decode(output, STRIDE)
    np.testing.assert_allclose(decoded[0], points[0].numpy(), atol=1e-3)
    assert ((probs[0] > 0.5) == (abnormal[0].numpy() > 0.5)).all()
    np.testing.assert_allclose(peaks[0], 1.0)


def test_missing_points_are_masked_out_of_every_loss_term() -> None:
    points = _points()
    points[0, 4] = float("nan")
    abnormal = torch.ones(1, 11)
    t = build_targets(points, abnormal, SIZE, STRIDE, SIGMA)
    assert not t.point_mask[0, 4] and not t.class_mask[0, 4]
    output = torch.randn(1, 44, 32, 32)
    base = ccfnet_loss(output, t).total
    garbage = output.clone()
    garbage[:, [4, 15, 26, 37]] = 1e3  # channel 4 of heatmaps, y, x offsets and logits
    assert ccfnet_loss(garbage, t).total.item() == pytest.approx(base.item(), rel=1e-6)
    garbage[:, 5] += 1.0  # a present point's heatmap does count
    assert ccfnet_loss(garbage, t).total.item() > base.item()


def test_points_pushed_outside_the_image_are_masked() -> None:
    points = _points()
    points[0, 0] = torch.tensor([-30.0, 100.0])
    t = build_targets(points, torch.zeros(1, 11), SIZE, STRIDE, SIGMA)
    assert not t.point_mask[0, 0] and t.heatmaps[0, 0].abs().sum() == 0


def test_class_balanced_weights_follow_cui_with_b_n_minus_1_over_n() -> None:
    n = 40
    b = (n - 1) / n
    assert class_balanced_weight(n) == pytest.approx((1 - b) / (1 - b**n))
    assert pos_weight(10, 90) > 5  # rare positives weigh more
    assert pos_weight(0, 90) == 1.0


class _FlipProbe(torch.nn.Module):
    """Heatmaps depend on the image, so flipping shows whether TTA flips back."""

    stride = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.avg_pool2d(x[:, :1], 16)
        heat = pooled.expand(-1, 11, -1, -1)
        offsets = torch.zeros_like(heat)
        return torch.cat([heat, offsets, offsets, heat], dim=1)


def test_flip_tta_flips_the_second_pass_back_before_averaging() -> None:
    image = torch.zeros(1, 3, 64, 64)
    image[..., 8:24, 0:16] = 1.0
    plain = forward_tta(_FlipProbe(), image, flip=False)
    out = forward_tta(_FlipProbe(), image, flip=True)
    # The probe is flip-equivariant, so a correctly flipped-back average equals the plain pass; without the
    # flip back, half of the bright cell's value would land in the mirrored column.
    assert out[0, 0, 0, 0].item() == pytest.approx(0.5)
    assert out[0, 0, 0, 3].item() == pytest.approx(0.0)
    assert torch.allclose(out, plain)
