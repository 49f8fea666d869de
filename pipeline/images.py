"""Images for people: tensors to uint8 pictures and grids of samples (MLflow, reports)."""

from __future__ import annotations

import numpy as np
from torch import Tensor

__all__ = [
    "image_grid",
    "temporal_profile",
    "to_uint8_image",
]


def to_uint8_image(x: Tensor) -> np.ndarray:
    """A float image ``[3, H, W]`` in [0, 1] → uint8 ``[H, W, 3]``."""
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a [3, H, W] image, got shape {tuple(x.shape)}")
    return (x.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def image_grid(*rows: Tensor, max_items: int = 4, pad: int = 2) -> np.ndarray:
    """Images side by side as one uint8 ``[H, W, 3]`` grid: one row per tensor, one column
    per item (e.g. ``image_grid(originals, reconstructions)`` with tensors ``[B, 3, h, w]``
    in [0, 1]). Rows must share ``h, w``; at most ``max_items`` columns.
    """
    if not rows:
        raise ValueError("image_grid needs at least one row of images")
    shape = rows[0].shape[1:]
    for r in rows:
        if r.ndim != 4 or r.shape[1] != 3 or r.shape[1:] != shape:
            shapes = [tuple(t.shape) for t in rows]
            raise ValueError(f"image_grid rows must be [B, 3, h, w] of one size, got {shapes}")
    n = min(max_items, *(r.shape[0] for r in rows))
    _, h, w = shape
    grid = np.full((len(rows) * (h + pad) - pad, n * (w + pad) - pad, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j in range(n):
            y, x = i * (h + pad), j * (w + pad)
            grid[y : y + h, x : x + w] = to_uint8_image(r[j])
    return grid


def temporal_profile(frames: np.ndarray, row: int | None = None, scale: int = 1) -> np.ndarray:
    """Pixel row ``row`` (default: the middle) of every frame of ``uint8 [T, H, W, 3]``,
    stacked over time, each frame ``scale`` pixels tall (paper Figs. 1, 6): ``[T*scale, W, 3]``."""
    y = frames.shape[1] // 2 if row is None else row
    return np.repeat(frames[:, y], scale, axis=0)
