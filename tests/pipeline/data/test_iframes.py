"""I-frame files aligned with the shards (pipeline.data.iframes): coding on a Ray actor pool,
resume, and the readers the PLVC training and evaluation stages use."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data.clips import clip_rng, decode_png_rgb, draw_window
from pipeline.data.datasets import read_septuplets_ray
from pipeline.data.iframe_files import IFRAME_SCHEMA, IFrameError
from pipeline.data.iframes import code_iframes, iframe_side_by_side
from pipeline.data.training_clips import load_iframes, read_training_clips
from plvc.hific import HiFiC, HiFiCConfig, save_hific
from plvc.intra import get_intra_codec

pytestmark = pytest.mark.ray

SPLITS = ("train", "test")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny HiFiC checkpoint (its codes are real, only poor)."""
    torch.manual_seed(0)
    return save_hific(tmp_path_factory.mktemp("hific") / "hific.pt", HiFiC(HiFiCConfig.tiny()))


@pytest.fixture(scope="module")
def coded(
    ray_local: None, septuplet_shards: Path, weights: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    """``septuplet_shards`` (20 train + 6 test clips, 64x96) with I-frames. Do not modify."""
    out = tmp_path_factory.mktemp("iframes") / "low"
    # a stage passes paths relative to its own folder, which need not be where the Ray
    # cluster (this session's, started in the repo root) runs its tasks
    with contextlib.chdir(septuplet_shards.parent):
        result = code_iframes(
            Path(septuplet_shards.name),
            Path(os.path.relpath(out)),
            weights,
            quality="low",
            batch_size=4,
            num_actors=2,
            use_gpu=False,
            progress=False,
        )
    return out, result


def _rows(path: Path) -> dict[str, list[Any]]:
    return pq.read_table(path).to_pydict()


def test_iframe_files_mirror_the_shards_row_for_row(
    coded: tuple[Path, dict[str, Any]], septuplet_shards: Path, weights: Path
) -> None:
    out, result = coded
    assert result["written"] == 4 and result["kept"] == 0
    codec = get_intra_codec("hific", weights=weights)
    for split in SPLITS:
        shard_files = sorted((septuplet_shards / split).glob("part-*.parquet"))
        iframe_files = sorted((out / split).glob("part-*.parquet"))
        assert [f.name for f in iframe_files] == [f.name for f in shard_files]
        for shard, iframe in zip(shard_files, iframe_files, strict=True):
            meta, shard_meta = pq.read_metadata(iframe), pq.read_metadata(shard)
            assert meta.schema.to_arrow_schema().equals(IFRAME_SCHEMA)
            # the same row groups, so readers pair them one to one
            sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            assert sizes == [
                shard_meta.row_group(i).num_rows for i in range(shard_meta.num_row_groups)
            ]
            assert meta.metadata[b"plvc.source_plan"] == shard_meta.metadata[b"plvc.plan"]
            rows, shard_rows = _rows(iframe), _rows(shard)
            assert rows["clip_id"] == shard_rows["clip_id"]
            for i, stream in enumerate(rows["bitstream"]):
                assert rows["bits"][i] == 8 * len(stream) > 0
                assert (rows["height"][i], rows["width"][i]) == (64, 96)
                decoded = codec.decode(stream)  # another codec instance than the actors'
                expected = decoded.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
                stored = decode_png_rgb(rows["iframe_png"][i])
                np.testing.assert_array_equal(stored, expected)
                original = decode_png_rgb(shard_rows["frames"][i][0])
                mse = np.mean((original.astype(float) - stored.astype(float)) ** 2)
                assert rows["psnr_rgb"][i] == pytest.approx(10 * np.log10(255**2 / mse), abs=1e-3)

    manifest = result["manifest"]
    assert manifest["splits"]["train"]["clips"] == 20 and manifest["splits"]["test"]["clips"] == 6
    stats = manifest["splits"]["train"]["stats"]
    assert stats["clips"] == 20 and stats["bpp_min"] <= stats["bpp_median"] <= stats["bpp_p90"]
    assert manifest["codec"]["config"] == HiFiCConfig.tiny().to_dict()
    assert (out / "manifest.json").is_file()


def test_rerun_keeps_complete_files_and_redoes_damaged_and_stale_ones(
    coded: tuple[Path, dict[str, Any]], septuplet_shards: Path, weights: Path, tmp_path: Path
) -> None:
    out = Path(shutil.copytree(coded[0], tmp_path / "low"))
    kept_file, damaged = out / "train/part-00000.parquet", out / "train/part-00001.parquet"
    kept_bytes = kept_file.read_bytes()
    damaged.write_bytes(damaged.read_bytes()[:100])  # an interrupted copy, say
    (out / "train/part-00009.parquet").write_bytes(b"stale")  # no such shard any more
    (out / "train/.part-00002.parquet.123.tmp").write_bytes(b"half")
    result = code_iframes(
        septuplet_shards,
        out,
        weights,
        quality="low",
        batch_size=8,
        num_actors=1,
        use_gpu=False,
        progress=False,
    )
    assert (result["written"], result["kept"]) == (1, 3)
    assert kept_file.read_bytes() == kept_bytes
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert _rows(damaged) == _rows(coded[0] / "train/part-00001.parquet")

    # the keep decision includes the weights: each file records the digest of its codec
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    for path in (out / "train").glob("*.parquet"):
        assert pq.read_metadata(path).metadata[b"plvc.codec_sha256"] == digest.encode()


def test_training_reader_crops_frames_and_iframe_with_one_window(
    coded: tuple[Path, dict[str, Any]], septuplet_shards: Path
) -> None:
    out, _ = coded
    stored = {
        clip_id: decode_png_rgb(v["iframe_png"])
        for clip_id, v in load_iframes(out, "train").items()
    }
    # whole frames: the I-frame is exactly the stored decoded one, the frames the originals
    whole = read_training_clips(
        septuplet_shards / "train", out / "train", crop=None, random_flip=False, seed=0
    ).take_all()
    originals = {
        r["clip_id"]: r["frames"]
        for r in read_septuplets_ray(
            septuplet_shards / "train", crop=None, random_flip=False, seed=0
        ).take_all()
    }
    assert sorted(r["clip_id"] for r in whole) == sorted(stored)
    for r in whole:
        np.testing.assert_array_equal(r["iframe"], stored[r["clip_id"]])
        np.testing.assert_array_equal(r["frames"], originals[r["clip_id"]])
        assert r["frames"].shape == (7, 64, 96, 3)

    # random crops and flips: the window read_septuplets_ray draws, on both
    seed, crop = 5, (32, 48)
    rows = read_training_clips(
        septuplet_shards / "train",
        out / "train",
        crop=crop,
        random_flip=True,
        seed=seed,
        num_frames=3,
    ).take_all()
    same_crops = {
        r["clip_id"]: r["frames"]
        for r in read_septuplets_ray(
            septuplet_shards / "train", crop=crop, random_flip=True, seed=seed, num_frames=3
        ).take_all()
    }
    flips = 0
    for r in rows:
        w = draw_window(64, 96, crop, clip_rng(seed, r["clip_id"]), True)
        flips += w.flip
        full = stored[r["clip_id"]][w.top : w.top + w.height, w.left : w.left + w.width]
        np.testing.assert_array_equal(r["iframe"], full[:, ::-1] if w.flip else full)
        np.testing.assert_array_equal(r["frames"], same_crops[r["clip_id"]])
        assert r["frames"].shape == (3, 32, 48, 3) and r["iframe"].shape == (32, 48, 3)
    assert 0 < flips < len(rows)
    # a square crop as an int; the I-frame resembles frame 1, not a frame of another clip
    square = read_training_clips(
        septuplet_shards / "test", out / "test", crop=32, random_flip=False, seed=0
    ).take_all()
    assert len(square) == 6 and all(r["iframe"].shape == (32, 32, 3) for r in square)


def test_missing_stale_and_misaligned_iframes_are_refused(
    ray_local: None, coded: tuple[Path, dict[str, Any]], septuplet_shards: Path, tmp_path: Path
) -> None:
    shards = septuplet_shards / "train"

    missing = Path(shutil.copytree(coded[0] / "train", tmp_path / "missing"))
    (missing / "part-00001.parquet").unlink()
    with pytest.raises(IFrameError, match=r"no I-frames for shard .*part-00001\.parquet"):
        read_training_clips(shards, missing, crop=None, random_flip=False, seed=0)

    # made from other shards: the recorded plan differs
    stale = Path(shutil.copytree(coded[0] / "train", tmp_path / "stale"))
    path = stale / "part-00000.parquet"
    meta = {**pq.read_metadata(path).metadata, b"plvc.source_plan": b"0" * 64}
    pq.write_table(pq.read_table(path).replace_schema_metadata(meta), path)
    with pytest.raises(
        IFrameError,
        match=r"part-00000\.parquet was not made from .*plan 000000000000.*shards changed",
    ):
        read_training_clips(shards, stale, crop=None, random_flip=False, seed=0)

    # rows out of order (plan intact): caught by the task that reads them
    shuffled = Path(shutil.copytree(coded[0] / "train", tmp_path / "shuffled"))
    path = shuffled / "part-00001.parquet"
    table = pq.read_table(path).replace_schema_metadata(pq.read_metadata(path).metadata)
    order = pa.array([1, 0, *range(2, table.num_rows)])
    pq.write_table(table.take(order), path, row_group_size=3)
    with pytest.raises(Exception, match=r"not aligned with .*part-00001\.parquet: row 0 is clip"):
        read_training_clips(shards, shuffled, crop=None, random_flip=False, seed=0).take_all()

    with pytest.raises(IFrameError, match="no I-frame files"):
        read_training_clips(shards, tmp_path / "nothing", crop=None, random_flip=False, seed=0)
    with pytest.raises(IFrameError, match="run the iframes stage"):
        load_iframes(tmp_path / "nothing", "test")


def test_load_iframes_and_side_by_side(
    coded: tuple[Path, dict[str, Any]], septuplet_shards: Path
) -> None:
    out, _ = coded
    test = load_iframes(out, "test")
    rows = _rows(out / "test/part-00000.parquet")
    assert list(test) == rows["clip_id"]
    first = test[rows["clip_id"][0]]
    assert first["bitstream"] == rows["bitstream"][0]
    assert (
        first["bits"] == 8 * len(first["bitstream"])
        and first["iframe_png"] == rows["iframe_png"][0]
    )
    grid = iframe_side_by_side(septuplet_shards / "test", out / "test", 3)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 64 + 2, 3 * 96 + 4, 3)
    with pytest.raises(ValueError, match="split"):
        load_iframes(out, "val")
