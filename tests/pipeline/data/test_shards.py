"""pipeline.data.shards: septuplets to Parquet, bad clips skipped, resumable."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipeline.data.shards import (
    FORMAT_NAME,
    SEPTUPLET_SCHEMA,
    ShardError,
    list_shards,
    shard_septuplets,
)

from ..conftest import BAD_KINDS, FRAME_H, FRAME_W, TEST_IDS, TRAIN_IDS


def _shard(raw: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "rows_per_shard": 8,
        "row_group_rows": 3,
        "max_skipped_fraction": 0.0,
        "workers": 1,
        "progress": False,
    }
    kwargs.update(overrides)
    return shard_septuplets(raw, out, **kwargs)


def _identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def _rows(split_dir: Path) -> list[dict[str, Any]]:
    return [row for path in list_shards(split_dir) for row in pq.read_table(path).to_pylist()]


def test_shards_hold_the_exact_file_bytes_of_every_listed_clip(
    raw_septuplets: Path, septuplet_shards: Path
) -> None:
    for split, ids in (("train", TRAIN_IDS), ("test", TEST_IDS)):
        rows = _rows(septuplet_shards / split)
        assert [r["clip_id"] for r in rows] == sorted(ids)
        for row in rows:
            clip_dir = raw_septuplets / "sequences" / row["clip_id"]
            on_disk = [(clip_dir / f"im{k}.png").read_bytes() for k in range(1, 8)]
            assert row["frames"] == on_disk, row["clip_id"]
            assert (row["height"], row["width"]) == (FRAME_H, FRAME_W)


def test_shard_files_follow_the_schema_and_row_group_size(septuplet_shards: Path) -> None:
    manifest = json.loads((septuplet_shards / "manifest.json").read_text())
    train_files = list_shards(septuplet_shards / "train")
    # 20 clips, 8 per shard
    assert [pq.ParquetFile(p).metadata.num_rows for p in train_files] == [8, 8, 4]
    for path in train_files + list_shards(septuplet_shards / "test"):
        pfile = pq.ParquetFile(path)
        assert pfile.schema_arrow.equals(SEPTUPLET_SCHEMA, check_metadata=False)
        meta = pfile.schema_arrow.metadata
        assert meta[b"plvc.format"] == FORMAT_NAME.encode()
        assert meta[b"plvc.format_version"] == b"1"
        sizes = [pfile.metadata.row_group(i).num_rows for i in range(pfile.num_row_groups)]
        assert all(s == 3 for s in sizes[:-1]) and 1 <= sizes[-1] <= 3, (path, sizes)
        assert sum(sizes) == pfile.metadata.num_rows
    assert manifest["ok"] and manifest["errors"] == []
    assert manifest["splits"]["train"]["shards"] == 3
    assert [f["path"] for f in manifest["splits"]["train"]["files"]] == [
        f"train/{p.name}" for p in train_files
    ]
    assert manifest["totals"]["clips"] == len(TRAIN_IDS) + len(TEST_IDS)
    assert manifest["totals"]["file_bytes"] == sum(
        p.stat().st_size for p in train_files + list_shards(septuplet_shards / "test")
    )
    # nothing but finished shards is left behind
    leftovers = [p.name for p in (septuplet_shards / "train").iterdir() if p not in train_files]
    assert leftovers == []


@pytest.mark.parametrize("verify", ["decode", "structure"])
def test_bad_clips_are_skipped_and_listed_with_their_reason(
    raw_copy: Path, tmp_path: Path, plant_bad: Callable[[Path, str, str], None], verify: str
) -> None:
    bad = dict(zip(TRAIN_IDS[: len(BAD_KINDS)], BAD_KINDS, strict=True))
    for clip_id, kind in bad.items():
        plant_bad(raw_copy, clip_id, kind)
    # listed twice in train, and a test clip that is also listed in train
    with (raw_copy / "sep_trainlist.txt").open("a") as f:
        f.write(f"{TRAIN_IDS[-1]}\n{TEST_IDS[0]}\n")

    manifest = _shard(raw_copy, tmp_path / "out", max_skipped_fraction=0.5, verify=verify)

    train = manifest["splits"]["train"]
    reasons = {s["clip_id"]: s["reason"] for s in train["skipped_clips"]}
    expected_fragments = {
        "missing_frame": "missing im4.png",
        "corrupt_png": "im4.png is corrupt",
        "truncated_png": "im4.png is corrupt",
        "wrong_size": "im4.png is 48x32 (WxH) but im1.png is 96x64",
        "grayscale": "im4.png has 1 channel(s), expected 3",
        "unreadable": "cannot read im4.png",
        "not_png": "im4.png is not a PNG file",
        "rgba": "im4.png has 4 channel(s), expected 3",
        "sixteen_bit": "im4.png has 16-bit samples, expected 8-bit",
    }
    for clip_id, kind in bad.items():
        assert expected_fragments[kind] in reasons[clip_id], (kind, reasons[clip_id])
    duplicate_reasons = [
        s["reason"] for s in train["skipped_clips"] if s["clip_id"] == TRAIN_IDS[-1]
    ]
    assert duplicate_reasons == ["listed twice in sep_trainlist.txt"]
    overlap = [s["reason"] for s in manifest["splits"]["test"]["skipped_clips"]]
    assert overlap == ["also listed in sep_trainlist.txt (split overlap)"]

    assert train["listed"] == len(TRAIN_IDS) + 2
    assert train["skipped"] == len(BAD_KINDS) + 1
    assert train["clips"] == len(TRAIN_IDS) - len(BAD_KINDS) + 1  # + the test clip
    assert train["skipped_fraction"] == pytest.approx(train["skipped"] / train["listed"], abs=1e-6)
    written = [r["clip_id"] for r in _rows(tmp_path / "out" / "train")]
    assert sorted(set(TRAIN_IDS) - set(bad) | {TEST_IDS[0]}) == written
    assert [r["clip_id"] for r in _rows(tmp_path / "out" / "test")] == TEST_IDS[1:]


def test_too_many_skipped_clips_fail_after_writing_the_manifest(
    raw_copy: Path, tmp_path: Path, plant_bad: Callable[[Path, str, str], None]
) -> None:
    plant_bad(raw_copy, TRAIN_IDS[3], "corrupt_png")
    plant_bad(raw_copy, TRAIN_IDS[4], "missing_frame")
    out = tmp_path / "out"
    with pytest.raises(ShardError, match=r"split 'train': 2 of 20 listed clips skipped \(10\.0%"):
        _shard(raw_copy, out, max_skipped_fraction=0.05)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ok"] is False
    assert len(manifest["errors"]) == 1 and TRAIN_IDS[3] in manifest["errors"][0]
    assert manifest["splits"]["train"]["skipped"] == 2
    assert manifest["splits"]["test"]["skipped"] == 0
    # 10% is within a 10% limit
    assert _shard(raw_copy, out, max_skipped_fraction=0.1)["ok"]


def test_a_split_without_valid_clips_fails(raw_copy: Path, tmp_path: Path) -> None:
    (raw_copy / "sep_testlist.txt").write_text("\n\n")
    out = tmp_path / "out"
    with pytest.raises(ShardError, match="split 'test': no valid clips"):
        _shard(raw_copy, out, max_skipped_fraction=1.0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["test"]["listed"] == 0
    assert manifest["splits"]["train"]["clips"] == len(TRAIN_IDS)


def test_missing_layout_is_a_clear_error(raw_copy: Path, tmp_path: Path) -> None:
    (raw_copy / "sep_trainlist.txt").unlink()
    with pytest.raises(ShardError, match=r"sep_trainlist\.txt: cannot read clip list"):
        _shard(raw_copy, tmp_path / "out")
    with pytest.raises(ShardError, match="no 'sequences' folder"):
        _shard(tmp_path, tmp_path / "out")


def test_rerun_keeps_finished_shards_and_rewrites_missing_or_stale_ones(
    raw_copy: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = _shard(raw_copy, out)
    files = list_shards(out / "train")
    # a kept file is the same inode with the same mtime; a rewrite is renamed over it
    before = {p.name: (_identity(p), p.read_bytes()) for p in files}
    files[1].unlink()
    (out / "train" / "part-00042.parquet").write_bytes(b"left from a larger run")
    (out / "train" / ".part-00000.parquet.123.tmp").write_bytes(b"interrupted write")

    second = _shard(raw_copy, out)

    assert second == first
    after = {p.name: (_identity(p), p.read_bytes()) for p in list_shards(out / "train")}
    assert set(after) == set(before)
    assert after[files[0].name] == before[files[0].name]  # kept
    assert after[files[2].name] == before[files[2].name]
    assert after[files[1].name][0] != before[files[1].name][0]
    assert after[files[1].name][1] == before[files[1].name][1]  # rewritten, same bytes
    assert sorted(os.listdir(out / "train")) == sorted(before)

    # a changed clip file changes that shard's plan: only that shard is rewritten
    clip_frame = raw_copy / "sequences" / TRAIN_IDS[0] / "im1.png"
    clip_frame.write_bytes(clip_frame.read_bytes() + b"\0")  # trailing bytes: still decodes
    third = _shard(raw_copy, out)
    changed = [
        name for name, (ident, _) in after.items() if _identity(out / "train" / name) != ident
    ]
    assert changed == [files[0].name]
    assert (
        third["splits"]["train"]["files"][0]["plan"] != first["splits"]["train"]["files"][0]["plan"]
    )


def test_worker_processes_write_the_same_shards_as_one_process(
    raw_septuplets: Path, septuplet_shards: Path, tmp_path: Path
) -> None:
    manifest = _shard(raw_septuplets, tmp_path / "out", workers=2)
    assert manifest == json.loads((septuplet_shards / "manifest.json").read_text()) | {
        "raw_root": str(raw_septuplets)
    }
    for split in ("train", "test"):
        ours = [p.read_bytes() for p in list_shards(tmp_path / "out" / split)]
        reference = [p.read_bytes() for p in list_shards(septuplet_shards / split)]
        assert ours == reference
