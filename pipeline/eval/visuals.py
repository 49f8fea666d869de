"""Images of an evaluation: decoded frames of every method side by side and temporal profiles
(paper Figs. 1 and 6).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.eval.testset import TestSequence
from pipeline.images import temporal_profile

__all__ = [
    "VISUAL_SPAN",
    "Visuals",
    "matched_x265_anchor",
]


#: frames of a sequence shown in the images (frame grid and temporal profile)
VISUAL_SPAN = 32


_VIEW = (256, 448)  # (height, width) of the centre window shown of each frame


_LABEL_WIDTH = 176


def _label_strip(lines: Sequence[str], height: int, width: int = _LABEL_WIDTH) -> np.ndarray:
    import cv2

    strip = np.full((height, width, 3), 255, np.uint8)
    for k, text in enumerate(lines):
        y = 16 + 16 * k
        if y > height - 2:
            break
        cv2.putText(strip, text, (4, y), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


class Visuals:
    """Decoded frames and temporal profiles of one sequence, every method on one image."""

    def __init__(self, seq: TestSequence, gop: int) -> None:
        self.seq = seq
        self.span = min(seq.num_frames, VISUAL_SPAN)
        self.period = period = seq.gop(gop)
        self.columns = sorted({0, min(period, self.span) - 1, self.span - 1})
        vh, vw = min(_VIEW[0], seq.height), min(_VIEW[1], seq.width)
        self.top, self.left = (seq.height - vh) // 2, (seq.width - vw) // 2
        self.view = (vh, vw)
        self.entries: list[tuple[list[str], np.ndarray]] = []
        self.add(["original", seq.name[:26]], seq.frames)

    def add(self, label: Sequence[str], decoded: np.ndarray, position: int | None = None) -> None:
        """Keep the shown window of ``decoded`` (``uint8 [T, H, W, 3]``), labelled."""
        vh, vw = self.view
        window = decoded[: self.span, self.top : self.top + vh, self.left : self.left + vw]
        entry = (list(label), np.ascontiguousarray(window))
        self.entries.insert(len(self.entries) if position is None else position, entry)

    def render(self) -> dict[str, np.ndarray]:
        vh, vw = self.view
        gap = 4
        rows = []
        header = [_label_strip([f"{self.seq.width}x{self.seq.height}"], 20)]
        for c in self.columns:
            kind = "I" if c % self.period == 0 else "P"
            header += [
                np.full((20, gap, 3), 255, np.uint8),
                _label_strip([f"frame {c} ({kind})"], 20, vw),
            ]
        rows.append(np.concatenate(header, axis=1))
        for label, window in self.entries:
            cells = [_label_strip(label, vh)]
            for c in self.columns:
                cells += [np.full((vh, gap, 3), 255, np.uint8), window[c]]
            rows += [
                np.full((gap, rows[0].shape[1], 3), 255, np.uint8),
                np.concatenate(cells, axis=1),
            ]
        scale = max(1, 96 // self.span)
        blocks = []
        for label, window in self.entries:
            profile = temporal_profile(window, scale=scale)
            strip = _label_strip(label, max(profile.shape[0], 36))
            if profile.shape[0] < strip.shape[0]:
                pad = np.full((strip.shape[0] - profile.shape[0], vw, 3), 255, np.uint8)
                profile = np.concatenate([profile, pad])
            blocks += [
                np.concatenate([strip, profile], axis=1),
                np.full((gap, _LABEL_WIDTH + vw, 3), 255, np.uint8),
            ]
        return {"frames": np.concatenate(rows), "profile": np.concatenate(blocks[:-1])}


def matched_x265_anchor(
    seq: TestSequence, target_bpp: float, gop: int, ffmpeg: str | None, span: int
) -> tuple[np.ndarray, float] | None:
    """x265 on the first ``span`` frames at ``target_bpp`` (two-pass), for the images."""
    from pipeline.eval.baselines import BaselineConfig, BaselineError, encode_decode

    cfg = BaselineConfig(
        codec="x265",
        rate_control="bpp",
        points=(target_bpp,),
        gop_size=min(seq.gop(gop), span),
        fps=seq.fps,
        ffmpeg=ffmpeg,
    )
    try:
        source = torch.from_numpy(np.ascontiguousarray(seq.frames[:span]))
        result = encode_decode(
            source.permute(0, 3, 1, 2).float().div(255.0), cfg, target_bpp, matrix=seq.matrix
        )
    except BaselineError as exc:
        warnings.warn(f"{seq.name}: no x265 image at {target_bpp:.4f} bpp: {exc}", stacklevel=2)
        return None
    frames = (result.decoded * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return frames, result.bpp
