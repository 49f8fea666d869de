"""PSNR on YUV 4:2:0, the learned-video-coding field's measure (DCVC's test conditions):
``(6 PSNR_Y + PSNR_U + PSNR_V) / 8`` on the 8-bit planes the anchors code."""

from __future__ import annotations

import numpy as np
from torch import Tensor

__all__ = ["yuv420_psnr"]


def _plane_psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def yuv420_psnr(x: Tensor, x_hat: Tensor, matrix: str = "bt601") -> list[float]:
    """Per frame ``(6 Y + U + V) / 8`` PSNR (dB) of RGB ``[T, 3, H, W]`` frames in [0, 1] (even
    sizes), both converted to 8-bit limited-range YUV 4:2:0 with ``matrix`` exactly as the
    anchors' input is (:func:`plvc.video_io.rgb_to_yuv420`); identical frames give inf."""
    from plvc.video_io import rgb_to_yuv420, tensor_to_frames

    out = []
    for a, b in zip(tensor_to_frames(x), tensor_to_frames(x_hat), strict=True):
        planes = zip(rgb_to_yuv420(a, matrix), rgb_to_yuv420(b, matrix), strict=True)  # type: ignore[arg-type]
        y, u, v = (_plane_psnr(p, q) for p, q in planes)
        out.append((6 * y + u + v) / 8)
    return out
