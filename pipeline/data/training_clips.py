"""What the PLVC phases train and are checked on: clips of the shards paired row by row with
their decoded HiFiC I-frames (:func:`read_training_clips`, a Ray Dataset), and the I-frame
columns for a process that needs them whole (:func:`load_iframes`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.data.vimeo_layout import FRAMES_PER_CLIP, SPLIT_LISTS

if TYPE_CHECKING:
    import ray.data
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ray.data
from pipeline.data.clips import (
    READ_COLUMNS,
    apply_window,
    binary_views,
    check_num_frames,
    clip_rng,
    decode_clip,
    decode_png_rgb,
    draw_window,
)
from pipeline.data.iframe_files import (
    FORMAT_NAME,
    IFrameError,
    file_metadata,
    list_parts,
    read_parquet_meta,
    resolve_filesystem,
    row_group_sizes,
)

__all__ = [
    "load_iframes",
    "plan_pairs",
    "read_iframe_columns",
    "read_pair",
    "read_training_clips",
]


def plan_pairs(
    shard_dir: str | os.PathLike[str],
    iframe_dir: str | os.PathLike[str],
    filesystem: pafs.FileSystem | None,
) -> tuple[tuple[pafs.FileSystem, pafs.FileSystem], list[dict[str, Any]]]:
    """One work item per shard row group: (shard file, I-frame file, row group, first row),
    with the (shard, I-frame) filesystems.

    Checks from the Parquet footers alone that every shard has its I-frame file, with the
    same number of rows and made from this very shard (its ``plvc.plan``).
    """
    fs, shard_root = resolve_filesystem(shard_dir, filesystem)
    iframe_fs, iframe_root = resolve_filesystem(iframe_dir, filesystem)
    shards = list_parts(fs, shard_root)
    if not shards:
        raise IFrameError(f"no shard files (part-*.parquet) in {shard_dir}")
    iframes = {Path(p).name: p for p in list_parts(iframe_fs, iframe_root)}
    if not iframes:
        raise IFrameError(
            f"no I-frame files in {iframe_dir}: run the iframes stage for this quality first"
        )
    extra = sorted(set(iframes) - {Path(s).name for s in shards})
    if extra:
        raise IFrameError(
            f"{iframe_dir} holds {extra[0]} (and {len(extra) - 1} more) with no shard of that "
            f"name in {shard_dir}: the I-frames are stale; re-run the iframes stage"
        )
    items: list[dict[str, Any]] = []
    for shard in shards:
        name = Path(shard).name
        if name not in iframes:
            raise IFrameError(
                f"no I-frames for shard {shard}: {iframe_dir}/{name} is missing; "
                "re-run the iframes stage"
            )
        shard_meta = read_parquet_meta(fs, shard)
        iframe_meta = read_parquet_meta(iframe_fs, iframes[name])
        plan = file_metadata(shard_meta).get("plvc.plan")
        made_from = file_metadata(iframe_meta).get("plvc.source_plan")
        if plan is None or made_from != plan:
            raise IFrameError(
                f"{iframes[name]} was not made from {shard} (source plan "
                f"{(made_from or 'none')[:12]}, shard plan {(plan or 'none')[:12]}): the "
                "shards changed since; re-run the iframes stage"
            )
        if iframe_meta.num_rows != shard_meta.num_rows:
            raise IFrameError(
                f"{iframes[name]} has {iframe_meta.num_rows} rows, {shard} has "
                f"{shard_meta.num_rows}: re-run the iframes stage"
            )
        start = 0
        for rg, rows in enumerate(row_group_sizes(shard_meta)):
            items.append(
                {"shard": shard, "iframes": iframes[name], "row_group": rg, "row_start": start}
            )
            start += rows
    return (fs, iframe_fs), items


def _iframe_rows(pfile: pq.ParquetFile, start: int, count: int, columns: Sequence[str]) -> pa.Table:
    """Rows ``[start, start + count)`` of a Parquet file, reading only the row groups they
    touch (the I-frame files mirror the shards' row groups, so usually exactly one)."""
    sizes = row_group_sizes(pfile.metadata)
    groups, offset, first_offset = [], 0, None
    for rg, n in enumerate(sizes):
        if offset + n > start and offset < start + count:
            groups.append(rg)
            first_offset = offset if first_offset is None else first_offset
        offset += n
    if not groups:
        raise IFrameError(f"rows {start}..{start + count} are not in the file")
    table = pfile.read_row_groups(groups, columns=list(columns))
    return table.slice(start - first_offset, count)


def read_pair(
    item: dict[str, Any],
    *,
    fs: tuple[pafs.FileSystem, pafs.FileSystem],
    crop: tuple[int, int] | None,
    random_flip: bool,
    seed: int,
    epoch: int,
    num_frames: int,
    batch_size: int,
    with_clip_id: bool,
) -> Iterator[dict[str, np.ndarray]]:
    shard_path, iframe_path = item["shard"], item["iframes"]
    shard_fs, iframe_fs = fs
    with shard_fs.open_input_file(shard_path) as sh, iframe_fs.open_input_file(iframe_path) as ih:
        table = pq.ParquetFile(sh).read_row_group(item["row_group"], columns=READ_COLUMNS)
        iframes = _iframe_rows(
            pq.ParquetFile(ih), item["row_start"], table.num_rows, ["clip_id", "iframe_png"]
        )
    clip_ids = table.column("clip_id").to_pylist()
    iframe_ids = iframes.column("clip_id").to_pylist()
    if clip_ids != iframe_ids:
        row = next(i for i, (a, b) in enumerate(zip(clip_ids, iframe_ids, strict=True)) if a != b)
        raise IFrameError(
            f"{iframe_path} is not aligned with {shard_path}: row "
            f"{item['row_start'] + row} is clip {iframe_ids[row]!r} there and {clip_ids[row]!r} "
            "in the shard; re-run the iframes stage"
        )
    heights = table.column("height").to_numpy()
    widths = table.column("width").to_numpy()
    data, offsets = binary_views(table.column("frames").combine_chunks())
    pngs = iframes.column("iframe_png").to_pylist()
    for begin in range(0, len(clip_ids), batch_size):
        ids, frames, iframe_crops = [], [], []
        for i in range(begin, min(begin + batch_size, len(clip_ids))):
            clip_id, h, w = clip_ids[i], int(heights[i]), int(widths[i])
            try:
                window = draw_window(h, w, crop, clip_rng(seed, clip_id, epoch), random_flip)
                iframe = decode_png_rgb(pngs[i])
            except ValueError as exc:
                raise ValueError(f"clip {clip_id} ({iframe_path}): {exc}") from exc
            if iframe.shape[:2] != (h, w):
                raise IFrameError(
                    f"clip {clip_id}: the I-frame in {iframe_path} is "
                    f"{iframe.shape[1]}x{iframe.shape[0]}, the frames {w}x{h} (WxH)"
                )
            frames.append(
                decode_clip(
                    data,
                    offsets,
                    i,
                    clip_id=clip_id,
                    height=h,
                    width=w,
                    num_frames=num_frames,
                    window=window,
                )
            )
            iframe_crops.append(np.ascontiguousarray(apply_window(iframe, window)))
            ids.append(clip_id)
        out = {"frames": _stack(frames), "iframe": _stack(iframe_crops)}
        if with_clip_id:
            out["clip_id"] = np.array(ids, dtype=object)
        yield out


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    if arrays and all(a.shape == arrays[0].shape for a in arrays):
        return np.stack(arrays)
    # whole frames of different sizes: Ray keeps a variable-shape column
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def _read_pairs(batch: dict[str, np.ndarray], **settings: Any) -> Iterator[dict[str, np.ndarray]]:
    """The ``map_batches`` function of :func:`read_training_clips` (work items in, clips out)."""
    for i in range(len(batch["shard"])):
        item = {
            "shard": str(batch["shard"][i]),
            "iframes": str(batch["iframes"][i]),
            "row_group": int(batch["row_group"][i]),
            "row_start": int(batch["row_start"][i]),
        }
        yield from read_pair(item, **settings)


def read_training_clips(
    shard_dir: str | os.PathLike[str],
    iframe_dir: str | os.PathLike[str],
    *,
    crop: int | tuple[int, int] | None,
    random_flip: bool,
    seed: int,
    num_frames: int = FRAMES_PER_CLIP,
    epoch: int = 0,
    with_clip_id: bool = True,
    batch_size: int = 16,
    filesystem: pafs.FileSystem | None = None,
) -> ray.data.Dataset:
    """One split's clips with their decoded I-frames, as a Ray Dataset for PLVC training.

    Rows: ``{"clip_id": str, "frames": uint8 [num_frames, h, w, 3]`` (the ORIGINAL frames
    im1..imN), ``"iframe": uint8 [h, w, 3]}`` (the decoded I-frame), both cut with the SAME
    crop window and flip. The window is drawn exactly as
    :func:`pipeline.data.datasets.read_septuplets_ray` draws it (``clip_rng(seed, clip_id,
    epoch)``: top, left, then the flip), so both readers give the same crops.

    Args:
        shard_dir: a split folder of the shards (``data/shards/train``), local or a URI.
        iframe_dir: the matching split folder of the I-frames (``data/iframes/low/train``).
        crop: square side or ``(height, width)`` of the aligned random crop; None: whole
            frames (a flip is still drawn when ``random_flip``).
        random_flip: mirror frames and I-frame horizontally with probability 1/2.
        seed, epoch: with the clip id, fix each clip's crop and flip.
        num_frames: keep the first ``num_frames`` of the seven frames.
        with_clip_id: False drops the string column (``iter_torch_batches`` needs that).
        batch_size: clips per output block (bounds a task's memory).
        filesystem: a pyarrow filesystem for both paths (default: inferred).

    Frames and I-frames are read pairwise, shard file by I-frame file and row group by row
    group (the I-frame files are aligned with the shards by construction), with no join:
    a hash join (``Dataset.join``) would shuffle every frame's bytes through the object
    store each epoch (~60 GB for Vimeo-90k) and lose the shards' order, while this reads
    each byte once in ``#row groups`` parallel tasks. Alignment is still checked, not
    assumed: before any task runs, each I-frame file must exist, have the shard's row
    count and record the shard's plan hash (stale I-frames fail here); each task compares
    clip ids row by row.

    Raises:
        IFrameError: missing, stale or misaligned I-frame files (naming them).
        ValueError: a bad crop or ``num_frames``.
    """
    import ray.data

    check_num_frames(num_frames)
    if isinstance(crop, int):
        crop = (crop, crop)
    if crop is not None:
        crop = (int(crop[0]), int(crop[1]))
        draw_window(crop[0], crop[1], crop, None, False)  # rejects non-positive sizes now
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    fs, items = plan_pairs(shard_dir, iframe_dir, filesystem)
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(
        _read_pairs,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={
            "fs": fs,
            "crop": crop,
            "random_flip": random_flip,
            "seed": seed,
            "epoch": epoch,
            "num_frames": num_frames,
            "batch_size": batch_size,
            "with_clip_id": with_clip_id,
        },
    )


def read_iframe_columns(
    iframe_dir: str | os.PathLike[str], split: str, columns: Sequence[str]
) -> pa.Table:
    """``columns`` of every I-frame file of a split, in shard order."""
    if split not in SPLIT_LISTS:
        raise ValueError(f"split must be one of {sorted(SPLIT_LISTS)}, got {split!r}")
    fs, root = resolve_filesystem(Path(os.fspath(iframe_dir)) / split, None)
    files = list_parts(fs, root)
    if not files:
        raise IFrameError(
            f"no I-frame files in {Path(iframe_dir) / split}: run the iframes stage first"
        )
    tables = []
    for path in files:
        with fs.open_input_file(path) as handle:
            pfile = pq.ParquetFile(handle)
            if file_metadata(pfile.metadata).get("plvc.format") != FORMAT_NAME:
                raise IFrameError(f"{path} is not an I-frame file (no plvc-iframes format tag)")
            tables.append(pfile.read(columns=list(columns)))
    return pa.concat_tables(tables)


def load_iframes(iframe_dir: str | os.PathLike[str], split: str) -> dict[str, dict[str, Any]]:
    """A split's I-frames in memory for single-process use (evaluation):
    ``{clip_id: {"iframe_png": bytes, "bitstream": bytes, "bits": int, "height": int,
    "width": int}}``, clips in shard order. ``iframe_dir`` is a quality's folder
    (``data/iframes/low``)."""
    table = read_iframe_columns(
        iframe_dir, split, ["clip_id", "iframe_png", "bitstream", "bits", "height", "width"]
    )
    out: dict[str, dict[str, Any]] = {}
    rows = zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True)
    for clip_id, png, stream, bits, height, width in rows:
        if clip_id in out:
            raise IFrameError(f"{iframe_dir}/{split}: clip {clip_id} appears twice")
        out[clip_id] = {
            "iframe_png": png,
            "bitstream": stream,
            "bits": bits,
            "height": height,
            "width": width,
        }
    return out
