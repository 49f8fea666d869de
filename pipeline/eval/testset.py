"""The test set every method is measured on: held-out Vimeo-90k clips of the test shards and
raw YUV 4:2:0 sequences, centre-cropped once to a multiple of :data:`CROP_MULTIPLE` so every
method sees the same pixels (format: ``docs/evaluation.md``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.eval.metrics import EvaluationError

if TYPE_CHECKING:
    from pipeline.config import YUVSequence

__all__ = [
    "CROP_MULTIPLE",
    "TestSequence",
    "TestSet",
    "center_crop_box",
]


#: frames are centre-cropped to a multiple of this (HiFiC's stride 2^4 x 4; PLVC needs 16)
CROP_MULTIPLE = 64


def center_crop_box(
    height: int, width: int, multiple: int = CROP_MULTIPLE, *, name: str = "frames"
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of the centred crop to the largest multiple of ``multiple``."""
    h, w = height - height % multiple, width - width % multiple
    if h == 0 or w == 0:
        raise EvaluationError(
            f"{name}: {width}x{height} frames are smaller than the codec's {multiple}-pixel "
            "block; evaluation needs at least 64x64"
        )
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass
class TestSequence:
    """One test sequence, cropped: ``frames`` is RGB ``uint8 [T, H, W, 3]``."""

    __test__ = False  # not a pytest test class

    name: str
    source: str
    frames: np.ndarray
    fps: float
    source_size: tuple[int, int]
    crop_box: tuple[int, int, int, int]
    #: YCbCr matrix of the source: how anchors and Y-based metrics convert its RGB frames
    matrix: str = "bt601"
    group: str = ""

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])

    def gop(self, gop: int) -> int:
        """The GOP this sequence is coded with: ``gop`` capped at its length (-1: its length)."""
        return self.num_frames if gop == -1 else min(gop, self.num_frames)

    def describe(self, gop: int) -> dict[str, Any]:
        top, left, _, _ = self.crop_box
        return {
            "name": self.name,
            "source": self.source,
            "frames": self.num_frames,
            "height": self.height,
            "width": self.width,
            "source_height": self.source_size[0],
            "source_width": self.source_size[1],
            "crop_top": top,
            "crop_left": left,
            "gop": self.gop(gop),
            "fps": self.fps,
            "matrix": self.matrix,
            "group": self.group,
        }


def _crop(frames: np.ndarray, name: str, multiple: int) -> tuple[np.ndarray, tuple[int, ...]]:
    top, left, h, w = center_crop_box(frames.shape[1], frames.shape[2], multiple, name=name)
    return np.ascontiguousarray(frames[:, top : top + h, left : left + w]), (top, left, h, w)


class TestSet:
    """The evaluation's sequences, loaded one at a time (a UVG sequence is ~3.7 GB of RGB).

    ``yuv_sequences`` come first (``evaluate.sequences``, objects with ``name``, ``path``,
    ``width``, ``height``, ``frames``, ``fps``), then the Vimeo clips of ``shard_dir`` (a
    split folder such as ``data/shards/test``; None: no Vimeo clips). Files and shards are
    checked here, before any coding.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        shard_dir: str | os.PathLike[str] | None,
        *,
        max_clips: int | None = None,
        yuv_sequences: Sequence[YUVSequence] = (),
        multiple: int = CROP_MULTIPLE,
    ) -> None:
        self.multiple = multiple
        self.yuv = list(yuv_sequences)
        self._shards: Any = None
        self._clip_indices: list[int] = []
        seen: set[str] = set()
        for i, seq in enumerate(self.yuv):
            where = f"evaluate.sequences[{i}] ({seq.name})"
            if seq.name in seen:
                raise EvaluationError(f"{where}: the name {seq.name!r} is used twice")
            seen.add(seq.name)
            if not Path(seq.path).is_file():
                raise EvaluationError(f"{where}: {seq.path} does not exist")
            center_crop_box(seq.height, seq.width, multiple, name=where)
        if shard_dir is not None:
            from pipeline.data.datasets import SeptupletShards, spread_indices

            try:
                self._shards = SeptupletShards(shard_dir)
            except (FileNotFoundError, ValueError) as exc:
                raise EvaluationError(
                    f"test shards {shard_dir}: {exc} (run the shard stage first)"
                ) from None
            n = len(self._shards)
            k = n if max_clips is None else min(max_clips, n)
            # evenly spread over the sorted ids: clips of every source video, not the first one
            self._clip_indices = spread_indices(n, k)
        if not self.yuv and not self._clip_indices:
            raise EvaluationError(
                "no test sequences: the test shards hold no clips and evaluate.sequences is empty"
            )

    @property
    def names(self) -> list[str]:
        clips = [f"vimeo/{self._shards.clip_ids[i]}" for i in self._clip_indices]
        return [s.name for s in self.yuv] + clips

    def __len__(self) -> int:
        return len(self.yuv) + len(self._clip_indices)

    def total_frames(self) -> int:
        """Frames over all sequences (Vimeo clips: the shards' frames per clip)."""
        from pipeline.data.vimeo_layout import FRAMES_PER_CLIP

        return sum(s.frames for s in self.yuv) + FRAMES_PER_CLIP * len(self._clip_indices)

    def __iter__(self) -> Iterator[TestSequence]:
        for i, spec in enumerate(self.yuv):
            yield self.load_yuv(i, spec)
        for index in self._clip_indices:
            yield self._load_clip(index)

    def _load_clip(self, index: int, frames: int | None = None) -> TestSequence:
        item = self._shards[index]
        rgb = (item["frames"][:frames] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        name = f"vimeo/{item['clip_id']}"
        cropped, box = _crop(rgb, name, self.multiple)
        return TestSequence(name, "vimeo", cropped, 30.0, rgb.shape[1:3], box)  # type: ignore[arg-type]

    def heads(self, frames: int, sequences: int) -> list[TestSequence]:
        """The first ``frames`` frames of ``sequences`` sequences spread over the set (the
        anchors' rate search): only those frames are read."""
        from pipeline.data.datasets import spread_indices

        picked = []
        for index in spread_indices(len(self), min(sequences, len(self))):
            if index < len(self.yuv):
                spec = self.yuv[index]
                head = spec.model_copy(update={"frames": min(frames, spec.frames)})
                picked.append(self.load_yuv(index, head))
            else:
                picked.append(self._load_clip(self._clip_indices[index - len(self.yuv)], frames))
        return picked

    def load_yuv(self, i: int, spec: YUVSequence) -> TestSequence:
        """Read ``evaluate.sequences[i]`` (raw ``.yuv`` of the given size, or ``.y4m``)."""
        from plvc.errors import VideoIOError
        from plvc.video_io import open_video

        where = f"evaluate.sequences[{i}] ({spec.name})"
        try:
            reader = open_video(
                spec.path,
                size=(spec.width, spec.height),
                max_frames=spec.frames,
                matrix=spec.matrix,
            )
            if (reader.width, reader.height) != (spec.width, spec.height):
                raise EvaluationError(
                    f"{where}: {spec.path} is {reader.width}x{reader.height}, the params say "
                    f"{spec.width}x{spec.height}"
                )
            top, left, h, w = center_crop_box(spec.height, spec.width, self.multiple, name=where)
            frames = np.empty((spec.frames, h, w, 3), np.uint8)
            count = 0
            for frame in reader:
                frames[count] = frame[top : top + h, left : left + w]
                count += 1
        except VideoIOError as exc:
            raise EvaluationError(f"{where}: {exc}") from None
        if count < spec.frames:
            raise EvaluationError(
                f"{where}: {spec.path} holds {count} frames, evaluate.sequences[{i}].frames "
                f"asks for {spec.frames}"
            )
        return TestSequence(
            spec.name,
            "yuv",
            frames,
            float(spec.fps),
            (spec.height, spec.width),
            (top, left, h, w),
            matrix=spec.matrix,
            group=spec.group,
        )
