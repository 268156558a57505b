"""Inference: resize, forward with flip TTA, decode, map back to the slice's own pixels (and, for a refined model,
move each point within a patch of the slice; for a graded model, grade a patch of the slice at each point)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ccfnet_core.checkpoint import ModelCard, load_model
from ccfnet_core.decode import decode, forward_tta
from ccfnet_core.geometry import from_input_space
from ccfnet_core.levels import level_doubt
from ccfnet_core.model import GradedCCFNet, RefinedCCFNet
from ccfnet_core.readout import Readout, read
from ccfnet_core.sample import Prediction
from ccfnet_core.structures import DISC_INDICES, NUM_STRUCTURES


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resize_input(image: np.ndarray, size: int) -> torch.Tensor:
    """(3, H, W) float in [0, 1] -> (1, 3, size, size) tensor (bilinear, aspect not kept)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    if tensor.shape[-2:] == (size, size):
        return tensor
    return F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False)


def predict_images(
    model: nn.Module,
    images: Sequence[np.ndarray],
    input_size: int,
    stride: int,
    device: torch.device,
    flip: bool = True,
    batch_size: int = 8,
) -> list[Prediction]:
    """Predict the 11 points and probabilities for each (3, H, W) image, in that image's pixel indices."""
    predictions: list[Prediction] = []
    model.eval()
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        batch = torch.cat([resize_input(image, input_size) for image in chunk]).to(device)
        with torch.no_grad():
            output = forward_tta(model, batch, flip=flip)
        points, probs, peaks = decode(output, stride)
        for image, pts, prob, peak in zip(chunk, points, probs, peaks, strict=True):
            height, width = image.shape[-2:]
            slice_points = from_input_space(pts, height, width, input_size)
            network = model
            if isinstance(network, RefinedCCFNet):
                slice_points = refine_points(network, image, slice_points, device)
                network = network.network
            grades = None
            if isinstance(network, GradedCCFNet):
                prob = grade_points(network, image, slice_points, prob, device)
                grades = disc_grade_points(network, image, slice_points, device)
            predictions.append(
                Prediction(
                    points=slice_points,
                    probabilities=prob,
                    confidences=peak,
                    grade_probabilities=grades,
                    level_doubt=level_doubt(peak),
                )
            )
    return predictions


def refine_points(model: RefinedCCFNet, image: np.ndarray, points: np.ndarray, device: torch.device) -> np.ndarray:
    """(11, 2) points of a refined model: its refiners' points from patches of the middle slice at `points`."""
    middle = torch.from_numpy(np.ascontiguousarray(image[1], dtype=np.float32)).to(device)
    return model.refine(middle, points)


def grade_points(
    model: GradedCCFNet, image: np.ndarray, points: np.ndarray, network_probabilities: np.ndarray, device: torch.device
) -> np.ndarray:
    """P(abnormal) (11,) of a graded model: its patch grader at `points` of the middle slice, with the network's."""
    middle = torch.from_numpy(np.ascontiguousarray(image[1], dtype=np.float32)).to(device)
    network_logits = torch.logit(torch.from_numpy(network_probabilities), eps=1e-7).to(device)
    with torch.no_grad():
        logits = model.grade(middle, points, network_logits)
    return torch.sigmoid(logits.double()).cpu().numpy()


def disc_grade_points(
    model: GradedCCFNet, image: np.ndarray, points: np.ndarray, device: torch.device
) -> np.ndarray | None:
    """(11, 5) softmax over the disc classes at `points` (NaN rows for vertebrae), or None without a grade grader."""
    middle = torch.from_numpy(np.ascontiguousarray(image[1], dtype=np.float32)).to(device)
    with torch.no_grad():
        grades = model.disc_grades(middle, points)
    if grades is None:
        return None
    out = np.full((NUM_STRUCTURES, grades.shape[1]), np.nan)
    out[list(DISC_INDICES)] = grades.double().cpu().numpy()
    return out


class Predictor:
    """A loaded model and its card; load once per process and reuse.

    With `readout` (the default) predictions are read through the card's readout, when it has one: calibrated
    probabilities, the card's thresholds, grade words and the level warning (`ccfnet_core.readout`); without it,
    the raw outputs the readout is fitted on.
    """

    def __init__(self, model: nn.Module, card: ModelCard, device: torch.device, readout: bool = True):
        self.model = model
        self.card = card
        self.device = device
        self.readout = Readout.from_dict(card.readout) if readout else Readout()

    @classmethod
    def from_checkpoint(cls, path: Path, device: str = "auto", readout: bool = True) -> Predictor:
        target = pick_device(device)
        model, card = load_model(path, target)
        return cls(model, card, target, readout)

    def predict(self, images: Sequence[np.ndarray], flip: bool = True) -> list[Prediction]:
        raw = predict_images(self.model, images, self.card.input_size, self.card.stride, self.device, flip)
        return [read(self.readout, prediction) for prediction in raw]

    def heatmaps(self, image: np.ndarray, flip: bool = True) -> np.ndarray:
        """The 11 TTA-averaged heatmaps (11, h, w) at network resolution, clipped to [0, 1]."""
        batch = resize_input(image, self.card.input_size).to(self.device)
        with torch.no_grad():
            output = forward_tta(self.model, batch, flip=flip)
        return output[0, :11].clamp(0, 1).cpu().numpy()
