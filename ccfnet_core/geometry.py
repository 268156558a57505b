"""Coordinate conventions shared by targets, augmentation and decoding.

Annotations give points as pixel indices (x = column, y = row). Inside the library points live in continuous
"edge" coordinates, where pixel i spans [i, i + 1) and its centre is i + 0.5: the grid-cell centres of the
targets ((r + 0.5) * stride) and the decoded points use the same convention, so resizing is a plain scale.
"""

from __future__ import annotations

import numpy as np


def index_to_edge(points: np.ndarray) -> np.ndarray:
    return points + 0.5


def edge_to_index(points: np.ndarray) -> np.ndarray:
    return points - 0.5


def resize_scale(height: int, width: int, size: int) -> np.ndarray:
    """(sx, sy) that takes edge coordinates of an HxW image to a size x size resize of it (aspect not kept)."""
    return np.array([size / width, size / height], dtype=np.float64)


def to_input_space(points_index: np.ndarray, height: int, width: int, size: int) -> np.ndarray:
    """Pixel-index points of an HxW slice -> edge coordinates of the size x size network input."""
    return index_to_edge(points_index) * resize_scale(height, width, size)


def from_input_space(points_edge: np.ndarray, height: int, width: int, size: int) -> np.ndarray:
    """Edge coordinates of the network input -> pixel-index points of the HxW slice."""
    return edge_to_index(points_edge / resize_scale(height, width, size))
