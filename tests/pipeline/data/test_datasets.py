"""pipeline.data.datasets: decoding, aligned crops, the torch and Ray readers of the shards."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.data.clips import aligned_random_crop, batch_to_tensor, clip_rng, decode_png_rgb
from pipeline.data.datasets import SeptupletShards, read_encoded_septuplets_ray, read_septuplets_ray

from ..conftest import FRAME_H, FRAME_W, TEST_IDS, TRAIN_IDS


def _rgb_from_disk(raw: Path, clip_id: str, frames: int = 7) -> np.ndarray:
    clip_dir = raw / "sequences" / clip_id
    return np.stack(
        [
            cv2.cvtColor(cv2.imread(str(clip_dir / f"im{k}.png")), cv2.COLOR_BGR2RGB)
            for k in range(1, frames + 1)
        ]
    )


def _find_window(full: np.ndarray, crop: np.ndarray) -> tuple[int, int, bool]:
    """(top, left, flipped) of the one window of ``full`` [T,H,W,3] that equals ``crop``."""
    h, w = crop.shape[1:3]
    windows = np.lib.stride_tricks.sliding_window_view(full, (h, w), axis=(1, 2))
    hits = []
    for flipped in (False, True):
        target = crop[:, :, ::-1] if flipped else crop
        # windows: [T, H-h+1, W-w+1, 3, h, w]; target as [T, 1, 1, 3, h, w]
        equal = (windows == target.transpose(0, 3, 1, 2)[:, None, None]).all(axis=(0, 3, 4, 5))
        hits += [(int(t), int(le), flipped) for t, le in zip(*np.nonzero(equal), strict=True)]
    assert len(hits) == 1, f"crop matches {len(hits)} windows"
    return hits[0]


def test_decode_png_rgb_gives_rgb_and_rejects_bad_data(raw_septuplets: Path) -> None:
    path = raw_septuplets / "sequences" / TRAIN_IDS[0] / "im1.png"
    rgb = decode_png_rgb(path.read_bytes())
    assert rgb.shape == (FRAME_H, FRAME_W, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, cv2.imread(str(path))[..., ::-1])
    with pytest.raises(ValueError, match="0 bytes"):
        decode_png_rgb(b"")
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_png_rgb(path.read_bytes()[:100])


def test_aligned_random_crop_cuts_one_window_from_every_frame() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 200, size=(40, 50, 3), dtype=np.uint8)
    frames = np.stack([base + t for t in range(7)])  # frame t = frame 0 + t everywhere
    flips = set()
    for seed in range(12):
        crop = aligned_random_crop(frames, 16, 24, np.random.default_rng(seed), flip=True)
        assert crop.shape == (7, 16, 24, 3) and crop.flags.c_contiguous
        for t in range(7):
            np.testing.assert_array_equal(crop[t], crop[0] + t)
        _, _, flipped = _find_window(frames, crop)
        flips.add(flipped)
        again = aligned_random_crop(frames, 16, 24, np.random.default_rng(seed), flip=True)
        np.testing.assert_array_equal(again, crop)
    assert flips == {False, True}
    whole = aligned_random_crop(frames, 40, 50, np.random.default_rng(0), flip=False)
    np.testing.assert_array_equal(whole, frames)


def test_a_crop_larger_than_the_frames_is_refused() -> None:
    frames = np.zeros((7, 40, 50, 3), np.uint8)
    with pytest.raises(ValueError, match="crop height 41 is larger than the frame height 40"):
        aligned_random_crop(frames, 41, 50, np.random.default_rng(0), flip=False)
    with pytest.raises(ValueError, match="crop width 64 is larger than the frame width 50"):
        aligned_random_crop(frames, 8, 64, np.random.default_rng(0), flip=False)


def test_septuplet_shards_returns_the_clips_as_float_tensors(
    raw_septuplets: Path, septuplet_shards: Path
) -> None:
    ds = SeptupletShards(septuplet_shards / "train")
    assert len(ds) == len(TRAIN_IDS) and ds.clip_ids == sorted(TRAIN_IDS)
    for index in (0, 9, len(ds) - 1):  # across shards and row groups
        item = ds[index]
        frames = item["frames"]
        assert frames.shape == (7, 3, FRAME_H, FRAME_W) and frames.dtype == torch.float32
        expected = _rgb_from_disk(raw_septuplets, item["clip_id"])
        torch.testing.assert_close(frames, torch.from_numpy(expected).permute(0, 3, 1, 2) / 255)

    cropped = SeptupletShards(
        septuplet_shards / "test", crop=(32, 48), random_flip=True, seed=5, num_frames=5
    )
    item = cropped[2]
    assert item["clip_id"] == TEST_IDS[2] and item["frames"].shape == (5, 3, 32, 48)
    as_uint8 = (item["frames"] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    _find_window(_rgb_from_disk(raw_septuplets, TEST_IDS[2], frames=5), as_uint8)
    # the crop depends on (seed, clip id) only: same again, and in a fresh dataset
    torch.testing.assert_close(cropped[2]["frames"], item["frames"])
    reopened = SeptupletShards(
        septuplet_shards / "test", crop=(32, 48), random_flip=True, seed=5, num_frames=5
    )
    torch.testing.assert_close(reopened[2]["frames"], item["frames"])
    windows = {
        _find_window(
            _rgb_from_disk(raw_septuplets, TEST_IDS[2], frames=5),
            (
                SeptupletShards(septuplet_shards / "test", crop=(32, 48), seed=s, num_frames=5)[2][
                    "frames"
                ]
                * 255
            )
            .round()
            .to(torch.uint8)
            .permute(0, 2, 3, 1)
            .numpy(),
        )
        for s in range(4)
    }
    assert len(windows) > 1  # other seeds, other windows


def test_septuplet_shards_in_dataloader_workers(septuplet_shards: Path) -> None:
    ds = SeptupletShards(septuplet_shards / "test", crop=(32, 32), seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    assert [cid for b in batches for cid in b["clip_id"]] == TEST_IDS
    assert batches[0]["frames"].shape == (4, 7, 3, 32, 32)
    torch.testing.assert_close(batches[1]["frames"][0], ds[4]["frames"])


def test_septuplet_shards_refuses_bad_arguments_clearly(
    septuplet_shards: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="pass one of them"):
        SeptupletShards(septuplet_shards)
    with pytest.raises(FileNotFoundError, match="no Parquet shards"):
        SeptupletShards(tmp_path)
    with pytest.raises(ValueError, match=r"num_frames must be in 1\.\.7"):
        SeptupletShards(septuplet_shards / "test", num_frames=8)
    too_tall = SeptupletShards(septuplet_shards / "test", crop=(FRAME_H + 1, 32))
    with pytest.raises(
        ValueError, match=f"clip {TEST_IDS[0]}: crop height {FRAME_H + 1} is larger"
    ):
        too_tall[0]
    with pytest.raises(ValueError, match="positive sizes"):
        SeptupletShards(septuplet_shards / "test", crop=(0, 32))


def test_frames_to_tensor_layout_and_range() -> None:
    batch = np.random.default_rng(0).integers(0, 256, size=(2, 5, 8, 12, 3), dtype=np.uint8)
    batch.setflags(write=False)  # as Ray hands batches out
    tensor = batch_to_tensor(batch)
    assert tensor.shape == (2, 5, 3, 8, 12) and tensor.dtype == torch.float32
    assert tensor.is_contiguous()
    assert tensor[1, 4, 2, 7, 11].item() == pytest.approx(batch[1, 4, 7, 11, 2] / 255)
    assert tensor.min() >= 0 and tensor.max() <= 1
    torch.testing.assert_close(batch_to_tensor(torch.from_numpy(batch.copy())), tensor)
    with pytest.raises(ValueError, match="expected uint8"):
        batch_to_tensor(batch.astype(np.float32))


@pytest.mark.ray
def test_ray_reader_gives_the_same_clips_and_crops_as_the_torch_reader(
    ray_local: None, raw_septuplets: Path, septuplet_shards: Path
) -> None:
    split = septuplet_shards / "train"
    ds = read_septuplets_ray(split, crop=(32, 48), random_flip=True, seed=7, num_frames=5)
    rows = {row["clip_id"]: row["frames"] for row in ds.take_all()}
    assert sorted(rows) == sorted(TRAIN_IDS)
    reference = SeptupletShards(split, crop=(32, 48), random_flip=True, seed=7, num_frames=5)
    for index in range(len(reference)):
        item = reference[index]
        frames = rows[item["clip_id"]]
        assert frames.shape == (5, 32, 48, 3) and frames.dtype == np.uint8
        torch.testing.assert_close(batch_to_tensor(frames), item["frames"])

    whole = read_septuplets_ray(
        split, crop=None, random_flip=False, seed=0, with_clip_id=False, batch_size=4
    )
    whole_with_ids = read_septuplets_ray(split, crop=None, random_flip=False, seed=0)
    batch = next(iter(whole.iter_torch_batches(batch_size=len(TRAIN_IDS))))
    assert list(batch) == ["frames"]
    assert batch["frames"].shape == (len(TRAIN_IDS), 7, FRAME_H, FRAME_W, 3)
    with pytest.raises(ValueError, match="pass one of them"):
        read_septuplets_ray(septuplet_shards, crop=None, random_flip=False, seed=0)

    # the encoded reader: the same clips, each frame's PNG bytes as the shard stores them
    encoded = {row["clip_id"]: row for row in read_encoded_septuplets_ray(split).take_all()}
    assert sorted(encoded) == sorted(TRAIN_IDS)
    decoded = {row["clip_id"]: row["frames"] for row in whole_with_ids.take_all()}
    for clip_id, row in encoded.items():
        assert (row["height"], row["width"]) == (FRAME_H, FRAME_W) and len(row["frames"]) == 7
        for t, png in enumerate(row["frames"]):
            np.testing.assert_array_equal(decode_png_rgb(png), decoded[clip_id][t])
    with pytest.raises(ValueError, match="pass one of them"):
        read_encoded_septuplets_ray(septuplet_shards)


def test_clip_rng_is_stable_across_processes() -> None:
    code = (
        "from pipeline.data.datasets import clip_rng; "
        "print(clip_rng(3, '00001/0001').integers(1000, size=4).tolist())"
    )
    other_process = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.strip()
    draws = clip_rng(3, "00001/0001").integers(1000, size=4).tolist()
    assert other_process == str(draws)
    assert draws != clip_rng(3, "00001/0002").integers(1000, size=4).tolist()
    assert draws != clip_rng(3, "00001/0001", epoch=1).integers(1000, size=4).tolist()
    assert draws != clip_rng(4, "00001/0001").integers(1000, size=4).tolist()
