"""Small Vimeo-90k-layout raw folders with real-looking frames, and planted bad clips."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.data.shards import shard_septuplets

FRAME_H, FRAME_W = 64, 96
TRAIN_IDS = [f"{seq:05d}/{clip:04d}" for seq in (1, 2) for clip in range(1, 11)]
TEST_IDS = [f"00003/{clip:04d}" for clip in range(1, 7)]
BAD_KINDS = (
    "missing_frame",
    "corrupt_png",
    "truncated_png",
    "wrong_size",
    "grayscale",
    "unreadable",
    "not_png",
    "rgba",
    "sixteen_bit",
)


def synth_clip(
    rng: np.random.Generator, height: int = FRAME_H, width: int = FRAME_W, frames: int = 7
) -> list[np.ndarray]:
    """Seven BGR frames: a smooth gradient background, sensor-like noise, two moving shapes."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    base = (np.cos(angle) * xx / width + np.sin(angle) * yy / height) * 0.5 + 0.5
    tint = rng.uniform(60, 200, size=3).astype(np.float32)
    background = base[..., None] * tint + rng.uniform(0, 40, size=3).astype(np.float32)
    pos = rng.uniform([0, 0], [width, height], size=(2, 2))
    vel = rng.uniform(-3, 3, size=(2, 2))
    colors = rng.integers(0, 256, size=(2, 3))
    out = []
    for t in range(frames):
        frame = background.copy()
        for k in range(2):
            cx, cy = pos[k] + t * vel[k]
            if k == 0:
                cv2.circle(frame, (int(cx), int(cy)), height // 6, colors[k].tolist(), -1)
            else:
                cv2.rectangle(
                    frame,
                    (int(cx), int(cy)),
                    (int(cx) + width // 5, int(cy) + height // 5),
                    colors[k].tolist(),
                    -1,
                )
        frame += rng.normal(0, 3, size=frame.shape).astype(np.float32)
        out.append(np.clip(frame, 0, 255).astype(np.uint8))
    return out


def write_raw_layout(
    root: Path,
    train_ids: Iterable[str],
    test_ids: Iterable[str],
    *,
    seed: int = 0,
    height: int = FRAME_H,
    width: int = FRAME_W,
) -> Path:
    """Write ``root`` in Vimeo-90k septuplet layout; returns ``root``."""
    train_ids, test_ids = list(train_ids), list(test_ids)
    rng = np.random.default_rng(seed)
    for clip_id in train_ids + test_ids:
        clip_dir = root / "sequences" / clip_id
        clip_dir.mkdir(parents=True, exist_ok=True)
        for t, frame in enumerate(synth_clip(rng, height, width), start=1):
            assert cv2.imwrite(str(clip_dir / f"im{t}.png"), frame)
    # a trailing blank line, as in the real lists
    (root / "sep_trainlist.txt").write_text("\n".join(train_ids) + "\n\n")
    (root / "sep_testlist.txt").write_text("\n".join(test_ids) + "\n")
    return root


def plant_bad_clip(root: Path, clip_id: str, kind: str) -> None:
    """Damage one clip of a raw layout in the way ``kind`` names (one of BAD_KINDS)."""
    clip_dir = root / "sequences" / clip_id
    frame = clip_dir / "im4.png"
    if kind == "missing_frame":
        frame.unlink()
    elif kind == "corrupt_png":
        # flip bytes inside the image data: the chunk CRC and the deflate stream break
        data = bytearray(frame.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])
        frame.write_bytes(bytes(data))
    elif kind == "truncated_png":
        data = frame.read_bytes()
        frame.write_bytes(data[: len(data) // 2])
    elif kind == "wrong_size":
        image = cv2.imread(str(frame))
        assert cv2.imwrite(str(frame), cv2.resize(image, (FRAME_W // 2, FRAME_H // 2)))
    elif kind == "grayscale":
        image = cv2.imread(str(frame))
        assert cv2.imwrite(str(frame), cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
    elif kind == "unreadable":
        frame.chmod(0)
        if os.access(frame, os.R_OK):  # root reads anything: make it a folder instead
            frame.chmod(0o644)
            frame.unlink()
            frame.mkdir()
    elif kind == "not_png":
        image = cv2.imread(str(frame))
        ok, jpeg = cv2.imencode(".jpg", image)
        assert ok
        frame.write_bytes(jpeg.tobytes())
    elif kind == "rgba":
        image = cv2.imread(str(frame))
        assert cv2.imwrite(str(frame), cv2.cvtColor(image, cv2.COLOR_BGR2BGRA))
    elif kind == "sixteen_bit":
        image = cv2.imread(str(frame)).astype(np.uint16) * 257
        assert cv2.imwrite(str(frame), image)
    else:
        raise ValueError(f"unknown bad-clip kind {kind!r}; one of {BAD_KINDS}")


@pytest.fixture(scope="session")
def raw_septuplets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean raw layout: 20 train + 6 test clips of 7 frames, 64x96. Do not modify it."""
    return write_raw_layout(tmp_path_factory.mktemp("raw"), TRAIN_IDS, TEST_IDS, seed=1)


@pytest.fixture
def raw_copy(raw_septuplets: Path, tmp_path: Path) -> Path:
    """A private copy of ``raw_septuplets`` that a test may damage."""
    return Path(shutil.copytree(raw_septuplets, tmp_path / "raw"))


@pytest.fixture(scope="session")
def plant_bad() -> Callable[[Path, str, str], None]:
    """``plant_bad(root, clip_id, kind)``: damage a clip (kinds: BAD_KINDS)."""
    return plant_bad_clip


@pytest.fixture(scope="session")
def septuplet_shards(raw_septuplets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``raw_septuplets`` sharded (8 clips per shard, row groups of 3). Do not modify it."""
    out = tmp_path_factory.mktemp("shards")
    shard_septuplets(
        raw_septuplets,
        out,
        rows_per_shard=8,
        row_group_rows=3,
        max_skipped_fraction=0.0,
        workers=1,
        progress=False,
    )
    return out
