"""Display of the source slice: the VOI window and an 8-bit rendering, shared by GSPS and key image."""

from __future__ import annotations

import math
from typing import Final

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut

# Percentiles of the pixel values that bound the window when the source has none: robust to a few hot pixels.
_WINDOW_PERCENTILES: Final = (1.0, 99.0)


def modality_pixels(ds: Dataset) -> np.ndarray:
    """Decoded pixels after the modality LUT (rescale slope/intercept), as float64."""
    return np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)


def display_window(ds: Dataset, pixels: np.ndarray | None = None) -> tuple[float, float]:
    """(center, width): the source's first VOI window if it has one, else the 1st..99th percentile span."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        first_center = float(center[0] if _is_multi(center) else center)
        first_width = float(width[0] if _is_multi(width) else width)
        if math.isfinite(first_center) and math.isfinite(first_width) and first_width >= 1.0:
            return first_center, first_width
    values = modality_pixels(ds) if pixels is None else pixels
    low, high = np.percentile(values, _WINDOW_PERCENTILES)
    return float((low + high) / 2.0), float(max(high - low, 1.0))


def _is_multi(value: object) -> bool:
    return isinstance(value, MultiValue | list | tuple)


def render_gray(ds: Dataset, scale: int = 1) -> np.ndarray:
    """The slice as a viewer would show it by default: modality LUT, linear VOI window, MONOCHROME1 inverted.

    `scale` enlarges it by an integer factor (bilinear) so burned-in text stays legible on small matrices.
    Returns (rows*scale, columns*scale) uint8.
    """
    if scale < 1:
        raise ValueError(f'Argument "scale" must be at least 1, got {scale}.')
    pixels = modality_pixels(ds)
    center, width = display_window(ds, pixels)
    # PS3.3 C.11.2.1.2.1, linear function.
    scaled = np.clip((pixels - (center - 0.5)) / (width - 1.0 if width > 1.0 else 1.0) + 0.5, 0.0, 1.0)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        scaled = 1.0 - scaled
    gray = np.round(scaled * 255.0).astype(np.uint8)
    if scale == 1:
        return gray
    rows, columns = gray.shape
    image = Image.fromarray(gray, mode="L").resize((columns * scale, rows * scale), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def render_rgb(ds: Dataset, scale: int = 1) -> np.ndarray:
    """`render_gray` as (rows*scale, columns*scale, 3) uint8 RGB, the canvas of the key image."""
    gray = render_gray(ds, scale)
    return np.repeat(gray[:, :, None], 3, axis=2)


def patient_orientation(ds: Dataset) -> tuple[str, str]:
    """Patient Orientation (row direction, column direction) letters from Image Orientation (Patient).

    E.g. a sagittal slice with rows running anterior-to-posterior and columns head-to-feet gives ('P', 'F').
    Letters of the components that matter (> 0.25 of the unit vector) are listed, the largest first.
    """
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        raise ValueError("source_dataset lacks a valid ImageOrientationPatient")
    return _direction_letters([float(v) for v in iop[:3]]), _direction_letters([float(v) for v in iop[3:]])


def _direction_letters(vector: list[float]) -> str:
    positive, negative = ("L", "P", "H"), ("R", "A", "F")
    order = sorted(range(3), key=lambda axis: -abs(vector[axis]))
    letters = [
        (positive if vector[axis] > 0 else negative)[axis] for axis in order if abs(vector[axis]) > 0.25
    ]
    return "".join(letters[:3]) or (positive if vector[order[0]] > 0 else negative)[order[0]]
