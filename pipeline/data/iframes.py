"""I-frames: frame 1 of every clip coded once with HiFiC, stored aligned with the shards.

PLVC trains its P-frame codec on clips whose first frame is the *decoded* HiFiC I-frame,
so the ``iframes@<quality>`` stage codes im1 of every clip of both splits before training
(:func:`code_iframes`), and the training stages read frames and I-frames together
(:func:`read_training_clips`).

Layout (``out_dir`` = ``paths.iframes/<quality>``)::

    train/part-00000.parquet ...   one file per shard file, SAME name, SAME rows in the SAME
    test/part-00000.parquet ...    order, SAME row-group sizes as data/shards/<split>/
    manifest.json                  written last: its presence means the stage finished

Row schema (:data:`IFRAME_SCHEMA`, schema metadata ``plvc.format`` = ``"plvc-iframes"``,
``plvc.format_version`` = ``"1"``):

``clip_id`` (string)
    The shard row's clip id (``"<sequence>/<clip>"``).
``height``, ``width`` (int32)
    The frame size (the shard's); the I-frame is coded and stored at full size.
``iframe_png`` (binary)
    The DECODED I-frame as an 8-bit RGB PNG (lossless): exactly the pixels the intra
    codec's ``decode(bitstream)`` gives, which a PLVC decoder uses as its reference.
``bitstream`` (binary)
    The intra codec's bytes (a framed HiFiC stream, :func:`plvc.hific.pack_hific_stream`).
``bits`` (int64)
    ``8 * len(bitstream)``: the I-frame's real rate (bpp = bits / (height * width)).
``psnr_rgb`` (float32)
    PSNR in dB of the decoded I-frame against the original im1 (8-bit RGB, peak 255).

Each file's key-value metadata holds ``plvc.source_plan`` (the source shard's ``plvc.plan``
hash, :mod:`pipeline.data.shards`), ``plvc.codec_sha256`` (SHA-256 of the HiFiC weights file),
``plvc.codec`` (JSON: codec name, weights path, HiFiC config, coding device) and
``plvc.summary`` (JSON: clips, bits, mean bpp, mean PSNR). A re-run keeps a file whose
source plan, codec digest and format match and rewrites the others (temp file + rename);
files without a source shard are removed. A reader checks the same source plan, so
I-frames made from other shards (or stale ones) are refused instead of silently misaligned.

``manifest.json``: ``format``, ``format_version``, ``quality``, ``codec`` (as above, plus
``weights_sha256``), ``shards`` (the shard root), ``splits.<split>`` (``clips``,
``shards``, ``files`` [``path``, ``clips``, ``source_plan``], ``stats`` (:func:`iframe_stats`)),
``totals``. It holds no timestamps.

Pixel exactness: the stored PNG is the codec's decode of the stored bytes in the coding
process. On the CPU that decode is bit-exact in any process (``decode_threads`` 1); with
``iframes.use_gpu`` the pixels are a GPU decode's (``codec.device`` in the metadata), which a
CPU decoder reproduces only up to floating-point rounding.
"""

from __future__ import annotations

from pipeline.errors import PipelineError

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.io import atomic_path, is_temp_name, write_json_atomic
from pipeline.data.datasets import (
    _READ_COLUMNS,
    _apply_window,
    _binary_views,
    _check_num_frames,
    _decode_clip,
    _draw_window,
    clip_rng,
    decode_png_rgb,
)
from pipeline.data.shards import FRAMES_PER_CLIP, SPLIT_LISTS

if TYPE_CHECKING:
    import ray.data

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IFRAME_SCHEMA",
    "MANIFEST_NAME",
    "IFrameError",
    "code_iframes",
    "encode_png_rgb",
    "iframe_side_by_side",
    "iframe_stats",
    "load_iframes",
    "read_iframe_columns",
    "read_training_clips",
]

log = logging.getLogger(__name__)

FORMAT_NAME = "plvc-iframes"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: zlib level of the stored I-frame PNGs (lossless at any level; 3 balances size and time)
PNG_COMPRESSION = 3

IFRAME_SCHEMA = pa.schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("iframe_png", pa.binary(), nullable=False),
        pa.field("bitstream", pa.binary(), nullable=False),
        pa.field("bits", pa.int64(), nullable=False),
        pa.field("psnr_rgb", pa.float32(), nullable=False),
    ],
    metadata={"plvc.format": FORMAT_NAME, "plvc.format_version": str(FORMAT_VERSION)},
)

_PART_RE = re.compile(r"^part-\d{5,}\.parquet$")


class IFrameError(PipelineError):
    """I-frames are missing, stale, misaligned with the shards, or cannot be coded."""


# ---------------------------------------------------------------------------------------
# small helpers


def encode_png_rgb(image: np.ndarray, level: int = PNG_COMPRESSION) -> bytes:
    """An (H, W, 3) uint8 RGB array as PNG bytes (lossless)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    ok, buf = cv2.imencode(
        ".png", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, level]
    )
    if not ok:
        raise ValueError(f"OpenCV could not PNG-encode an image of shape {image.shape}")
    return buf.tobytes()


def _is_uri(path: str) -> bool:
    return "://" in path


def _filesystem(
    path: str | os.PathLike[str], filesystem: pafs.FileSystem | None
) -> tuple[pafs.FileSystem, str]:
    text = os.fspath(path)
    if filesystem is not None:
        return filesystem, text
    if _is_uri(text):
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), os.path.abspath(text)


def _list_parts(fs: pafs.FileSystem, folder: str) -> list[str]:
    """Finished ``part-*.parquet`` files of a folder (full paths), sorted; [] if absent."""
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return sorted(i.path for i in infos if i.is_file and _PART_RE.match(i.base_name))


def _kv(meta: pq.FileMetaData) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (meta.metadata or {}).items()}


def _read_meta(fs: pafs.FileSystem, path: str) -> pq.FileMetaData:
    with fs.open_input_file(path) as handle:
        return pq.ParquetFile(handle).metadata


def _row_group_sizes(meta: pq.FileMetaData) -> list[int]:
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


# ---------------------------------------------------------------------------------------
# reading: training clips with their I-frames


def _plan_pairs(
    shard_dir: str | os.PathLike[str],
    iframe_dir: str | os.PathLike[str],
    filesystem: pafs.FileSystem | None,
) -> tuple[tuple[pafs.FileSystem, pafs.FileSystem], list[dict[str, Any]]]:
    """One work item per shard row group: (shard file, I-frame file, row group, first row),
    with the (shard, I-frame) filesystems.

    Checks from the Parquet footers alone that every shard has its I-frame file, with the
    same number of rows and made from this very shard (its ``plvc.plan``).
    """
    fs, shard_root = _filesystem(shard_dir, filesystem)
    iframe_fs, iframe_root = _filesystem(iframe_dir, filesystem)
    shards = _list_parts(fs, shard_root)
    if not shards:
        raise IFrameError(f"no shard files (part-*.parquet) in {shard_dir}")
    iframes = {Path(p).name: p for p in _list_parts(iframe_fs, iframe_root)}
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
        shard_meta, iframe_meta = _read_meta(fs, shard), _read_meta(iframe_fs, iframes[name])
        plan = _kv(shard_meta).get("plvc.plan")
        made_from = _kv(iframe_meta).get("plvc.source_plan")
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
        for rg, rows in enumerate(_row_group_sizes(shard_meta)):
            items.append(
                {"shard": shard, "iframes": iframes[name], "row_group": rg, "row_start": start}
            )
            start += rows
    return (fs, iframe_fs), items


def _iframe_rows(pfile: pq.ParquetFile, start: int, count: int, columns: Sequence[str]) -> pa.Table:
    """Rows ``[start, start + count)`` of a Parquet file, reading only the row groups they
    touch (the I-frame files mirror the shards' row groups, so usually exactly one)."""
    sizes = _row_group_sizes(pfile.metadata)
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


def _read_pair(
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
        table = pq.ParquetFile(sh).read_row_group(item["row_group"], columns=_READ_COLUMNS)
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
    data, offsets = _binary_views(table.column("frames").combine_chunks())
    pngs = iframes.column("iframe_png").to_pylist()
    for begin in range(0, len(clip_ids), batch_size):
        ids, frames, iframe_crops = [], [], []
        for i in range(begin, min(begin + batch_size, len(clip_ids))):
            clip_id, h, w = clip_ids[i], int(heights[i]), int(widths[i])
            try:
                window = _draw_window(h, w, crop, clip_rng(seed, clip_id, epoch), random_flip)
                iframe = decode_png_rgb(pngs[i])
            except ValueError as exc:
                raise ValueError(f"clip {clip_id} ({iframe_path}): {exc}") from exc
            if iframe.shape[:2] != (h, w):
                raise IFrameError(
                    f"clip {clip_id}: the I-frame in {iframe_path} is "
                    f"{iframe.shape[1]}x{iframe.shape[0]}, the frames {w}x{h} (WxH)"
                )
            frames.append(
                _decode_clip(
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
            iframe_crops.append(np.ascontiguousarray(_apply_window(iframe, window)))
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
        yield from _read_pair(item, **settings)


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

    _check_num_frames(num_frames)
    if isinstance(crop, int):
        crop = (crop, crop)
    if crop is not None:
        crop = (int(crop[0]), int(crop[1]))
        _draw_window(crop[0], crop[1], crop, None, False)  # rejects non-positive sizes now
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    fs, items = _plan_pairs(shard_dir, iframe_dir, filesystem)
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
    fs, root = _filesystem(Path(os.fspath(iframe_dir)) / split, None)
    files = _list_parts(fs, root)
    if not files:
        raise IFrameError(
            f"no I-frame files in {Path(iframe_dir) / split}: run the iframes stage first"
        )
    tables = []
    for path in files:
        with fs.open_input_file(path) as handle:
            pfile = pq.ParquetFile(handle)
            if _kv(pfile.metadata).get("plvc.format") != FORMAT_NAME:
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


# ---------------------------------------------------------------------------------------
# writing: the iframes stage


def _first_frames(batch: dict[str, np.ndarray], *, fs: pafs.FileSystem) -> dict[str, Any]:
    """Shard row group -> its clips' im1 PNG bytes (only those go on to the coders)."""
    path, rg, start = str(batch["path"][0]), int(batch["row_group"][0]), int(batch["row_start"][0])
    with fs.open_input_file(path) as handle:
        table = pq.ParquetFile(handle).read_row_group(rg, columns=_READ_COLUMNS)
    data, offsets = _binary_views(table.column("frames").combine_chunks())
    n = table.num_rows
    first = [
        data[offsets[i * FRAMES_PER_CLIP] : offsets[i * FRAMES_PER_CLIP + 1]].tobytes()
        for i in range(n)
    ]
    return {
        "source": np.array([path] * n, dtype=object),
        "row": np.arange(start, start + n, dtype=np.int64),
        "clip_id": np.array(table.column("clip_id").to_pylist(), dtype=object),
        "height": table.column("height").to_numpy().astype(np.int32),
        "width": table.column("width").to_numpy().astype(np.int32),
        "im1_png": np.array(first, dtype=object),
    }


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


class IFrameCoder:
    """Ray Data actor: loads the HiFiC codec once, then codes im1 of each row.

    Output per row: the codec's bytes, their bits, the decoded I-frame as PNG (from
    ``decode(bitstream)``, never from the encoder's reconstruction) and its PSNR.
    """

    def __init__(self, weights: list[Any], sha256: str, device: str, threads: int) -> None:
        import ray
        import torch

        from plvc.intra import get_intra_codec

        if device == "cpu":
            torch.set_num_threads(threads)
        blob = ray.get(weights[0]) if not isinstance(weights[0], bytes | str) else weights[0]
        options = {"weights_sha256": sha256, "device": device}
        if isinstance(blob, str):  # a path every node sees
            self.codec = get_intra_codec("hific", weights=blob, **options)
            return
        # the weights travel through the object store: no shared file system needed
        with tempfile.TemporaryDirectory(prefix="plvc-hific-") as tmp:
            path = Path(tmp) / "hific.pt"
            path.write_bytes(blob)
            self.codec = get_intra_codec("hific", weights=path, **options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        n = len(batch["clip_id"])
        pngs, streams, bits, psnrs = [], [], np.empty(n, np.int64), np.empty(n, np.float32)
        for i in range(n):
            clip_id = str(batch["clip_id"][i])
            try:
                original = decode_png_rgb(batch["im1_png"][i])
            except ValueError as exc:
                raise IFrameError(f"clip {clip_id}: im1.png: {exc}") from exc
            image = torch.from_numpy(original).permute(2, 0, 1).float().div_(255.0)
            stream = self.codec.encode(image)
            decoded = self.codec.decode(stream)  # what any decoder of these bytes gets
            pixels = decoded.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
            pixels_np = pixels.permute(1, 2, 0).contiguous().numpy()
            if pixels_np.shape != original.shape:
                raise IFrameError(
                    f"clip {clip_id}: decoded {pixels_np.shape}, original {original.shape}"
                )
            pngs.append(encode_png_rgb(pixels_np))
            streams.append(stream)
            bits[i] = 8 * len(stream)
            psnrs[i] = _psnr(original, pixels_np)
        return {
            "source": batch["source"],
            "row": batch["row"],
            "clip_id": batch["clip_id"],
            "height": batch["height"],
            "width": batch["width"],
            "iframe_png": np.array(pngs, dtype=object),
            "bitstream": np.array(streams, dtype=object),
            "bits": bits,
            "psnr_rgb": psnrs,
        }


def _kept(path: Path, expected: dict[str, str], num_rows: int) -> bool:
    """A previous run's file for the same source shard and codec, complete."""
    if not path.is_file():
        return False
    try:
        meta = pq.read_metadata(path)
    except (OSError, pa.ArrowException):
        return False
    kv = _kv(meta)
    return meta.num_rows == num_rows and all(kv.get(k) == v for k, v in expected.items())


def _write_iframe_file(
    final: Path,
    rows: pa.Table,
    *,
    row_groups: list[int],
    metadata: dict[str, str],
) -> None:
    with (
        atomic_path(final) as tmp,
        pq.ParquetWriter(
            tmp,
            IFRAME_SCHEMA,
            # PNG and entropy-coded bytes do not compress further
            compression="none",
            use_dictionary=False,
            write_statistics=["clip_id", "height", "width", "bits", "psnr_rgb"],
        ) as writer,
    ):
        start = 0
        for n in row_groups:  # the shard's row groups: readers pair them one to one
            writer.write_table(rows.slice(start, n), row_group_size=n)
            start += n
        writer.add_key_value_metadata(metadata)


def _remove_stale(split_dir: Path, planned: set[str]) -> None:
    if not split_dir.is_dir():
        return
    for path in split_dir.iterdir():
        if is_temp_name(path.name) or (_PART_RE.match(path.name) and path.name not in planned):
            log.info("removing stale %s", path)
            path.unlink()


def iframe_stats(table: pa.Table) -> dict[str, float | int]:
    """Rate and quality summary of I-frame rows (columns ``bits``, ``height``, ``width``,
    ``psnr_rgb``): clips, bits, bpp mean/median/p90/min/max, PSNR mean."""
    bits = table.column("bits").to_numpy().astype(np.float64)
    pixels = table.column("height").to_numpy().astype(np.float64) * table.column(
        "width"
    ).to_numpy().astype(np.float64)
    if len(bits) == 0:
        return {"clips": 0, "bits": 0}
    bpp = bits / pixels
    psnr = table.column("psnr_rgb").to_numpy().astype(np.float64)
    finite = psnr[np.isfinite(psnr)]
    return {
        "clips": len(bits),
        "bits": int(bits.sum()),
        "bpp_mean": float(bpp.mean()),
        "bpp_median": float(np.median(bpp)),
        "bpp_p90": float(np.percentile(bpp, 90)),
        "bpp_min": float(bpp.min()),
        "bpp_max": float(bpp.max()),
        "psnr_mean": float(finite.mean()) if len(finite) else math.inf,
    }


def _actor_resources(use_gpu: bool, num_actors: int) -> tuple[int, dict[str, float], int]:
    """(actors, Ray resources per actor, torch threads per actor) for this cluster."""
    import ray

    total = ray.cluster_resources()
    if use_gpu:
        gpus = int(total.get("GPU", 0))
        if gpus < 1:
            raise IFrameError(
                "iframes.use_gpu is true but the Ray cluster has no GPU; set it to false"
            )
        return min(num_actors, gpus), {"num_gpus": 1, "num_cpus": 1}, 1
    cpus = float(total.get("CPU", 1))
    # leave a quarter core to the shard readers, or a full pool would starve them
    per_actor = min(1.0, max(0.1, (cpus - 0.25) / num_actors))
    return num_actors, {"num_cpus": per_actor}, max(1, int(per_actor))


def code_iframes(
    shard_root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    weights: str | os.PathLike[str],
    *,
    quality: str,
    batch_size: int,
    num_actors: int,
    use_gpu: bool,
    progress: bool = True,
    ship_weights: bool = True,
    start_ray: Callable[[], object] | None = None,
) -> dict[str, Any]:
    """Code im1 of every clip of both splits with the HiFiC checkpoint ``weights``.

    Writes ``out_dir/{train,test}/part-*.parquet`` aligned with ``shard_root``'s files and
    then ``out_dir/manifest.json`` (layout in the module docstring). Coding needs Ray:
    ``start_ray`` is called once the inputs are checked and some file needs coding (never
    when every file is kept), or Ray must already be initialised.
    Shards whose I-frame file is complete for the same shard plan and codec are kept.
    ``ship_weights``: send the checkpoint's bytes to the actors through Ray's object store
    (no shared file system needed) instead of its path.

    Returns ``{"manifest", "written", "kept"}`` (counts of files).

    Raises:
        plvc.errors.WeightsError: ``weights`` is missing or not a HiFiC checkpoint.
        IFrameError: no shards, no GPU when asked for one, or a coding failure.
    """
    from plvc.hific import load_hific
    from plvc.weights import file_sha256

    if batch_size < 1 or num_actors < 1:
        raise ValueError(
            f"batch_size and num_actors must be positive, got {batch_size} and {num_actors}"
        )
    shard_root, out_dir, weights = Path(shard_root), Path(out_dir), Path(weights)
    model, _ = load_hific(weights)  # a clear WeightsError naming the file, before Ray work
    digest = file_sha256(weights)
    codec_info = {
        "name": "hific",
        "weights": str(weights),
        "config": model.config.to_dict(),
        "device": "cuda" if use_gpu else "cpu",
    }
    del model
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)

    plans: dict[str, list[dict[str, Any]]] = {}
    pending: list[dict[str, Any]] = []
    kept = 0
    for split in SPLIT_LISTS:
        shards = [Path(p) for p in _list_parts(pafs.LocalFileSystem(), str(shard_root / split))]
        if not shards:
            raise IFrameError(f"no shard files in {shard_root / split}: run the shard stage first")
        _remove_stale(out_dir / split, {s.name for s in shards})
        plans[split] = []
        for shard in shards:
            meta = pq.read_metadata(shard)
            plan = _kv(meta).get("plvc.plan")
            if plan is None:
                raise IFrameError(f"{shard} has no plvc.plan metadata: not a shard file")
            expected = {
                "plvc.format": FORMAT_NAME,
                "plvc.format_version": str(FORMAT_VERSION),
                "plvc.source_plan": plan,
                "plvc.codec_sha256": digest,
            }
            entry = {
                "split": split,
                "shard": shard,
                "out": out_dir / split / shard.name,
                "plan": plan,
                "rows": meta.num_rows,
                "row_groups": _row_group_sizes(meta),
                "metadata": expected,
            }
            plans[split].append(entry)
            if _kept(entry["out"], expected, meta.num_rows):
                kept += 1
            else:
                pending.append(entry)
    if pending:
        if start_ray is not None:
            start_ray()
        _code_pending(
            pending,
            weights=weights,
            digest=digest,
            codec_info=codec_info,
            quality=quality,
            batch_size=batch_size,
            num_actors=num_actors,
            use_gpu=use_gpu,
            progress=progress,
            ship_weights=ship_weights,
        )
    manifest = _manifest(plans, shard_root, out_dir, codec_info, digest, quality)
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    return {"manifest": manifest, "written": len(pending), "kept": kept}


def _code_pending(
    pending: list[dict[str, Any]],
    *,
    weights: Path,
    digest: str,
    codec_info: dict[str, Any],
    quality: str,
    batch_size: int,
    num_actors: int,
    use_gpu: bool,
    progress: bool,
    ship_weights: bool,
) -> None:
    import ray
    import ray.data

    actors, resources, threads = _actor_resources(use_gpu, num_actors)
    by_source = {str(e["shard"]): e for e in pending}
    items = []
    for e in pending:
        start = 0
        for rg, n in enumerate(e["row_groups"]):
            items.append({"path": str(e["shard"]), "row_group": rg, "row_start": start})
            start += n
    weights_ref = ray.put(weights.read_bytes()) if ship_weights else str(weights.resolve())
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _first_frames,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"fs": pafs.LocalFileSystem()},
        num_cpus=0.25,
    )
    ds = ds.map_batches(
        IFrameCoder,
        batch_size=batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={
            "weights": [weights_ref],
            "sha256": digest,
            "device": "cuda" if use_gpu else "cpu",
            "threads": threads,
        },
        concurrency=actors,
        **resources,
    )
    # shards complete one after another, so at most a few are buffered here
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = progress
    received: dict[str, list[pa.Table]] = {}
    counts: dict[str, int] = {}
    total_clips = sum(e["rows"] for e in pending)
    done_clips = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for source in dict.fromkeys(batch.column("source").to_pylist()):
            part = batch.filter(pa.compute.equal(batch.column("source"), source))
            received.setdefault(source, []).append(part)
            counts[source] = counts.get(source, 0) + part.num_rows
            entry = by_source[source]
            if counts[source] == entry["rows"]:
                _finish_shard(entry, received.pop(source), codec_info, quality)
                done_clips += entry["rows"]
                if progress:
                    print(
                        f"[iframes@{quality}] {entry['split']}/{entry['out'].name}: "
                        f"{entry['rows']} clips ({done_clips}/{total_clips})",
                        flush=True,
                    )
    unfinished = sorted(str(by_source[s]["shard"]) for s in received)
    if unfinished or done_clips != total_clips:
        raise IFrameError(f"coding ended before these shards were complete: {unfinished}")


def _finish_shard(
    entry: dict[str, Any], parts: list[pa.Table], codec_info: dict[str, Any], quality: str
) -> None:
    rows = pa.concat_tables(parts).sort_by("row")
    order = rows.column("row").to_numpy()
    if not np.array_equal(order, np.arange(entry["rows"])):
        raise IFrameError(f"{entry['shard']}: coded rows are not exactly 0..{entry['rows'] - 1}")
    shard_ids = pq.read_table(entry["shard"], columns=["clip_id"]).column(0).to_pylist()
    if rows.column("clip_id").to_pylist() != shard_ids:
        raise IFrameError(f"{entry['shard']}: coded clip ids differ from the shard's")
    table = pa.Table.from_arrays(
        [rows.column(f.name).cast(f.type) for f in IFRAME_SCHEMA], schema=IFRAME_SCHEMA
    )
    stats = iframe_stats(table)
    metadata = {
        **entry["metadata"],
        "plvc.source_file": entry["shard"].name,
        "plvc.quality": quality,
        "plvc.codec": json.dumps(codec_info, sort_keys=True),
        "plvc.summary": json.dumps(stats, sort_keys=True),
    }
    _write_iframe_file(entry["out"], table, row_groups=entry["row_groups"], metadata=metadata)


def _manifest(
    plans: dict[str, list[dict[str, Any]]],
    shard_root: Path,
    out_dir: Path,
    codec_info: dict[str, Any],
    digest: str,
    quality: str,
) -> dict[str, Any]:
    splits: dict[str, Any] = {}
    for split, entries in plans.items():
        table = read_iframe_columns(out_dir, split, ["bits", "height", "width", "psnr_rgb"])
        splits[split] = {
            "clips": table.num_rows,
            "shards": len(entries),
            "files": [
                {"path": f"{split}/{e['out'].name}", "clips": e["rows"], "source_plan": e["plan"]}
                for e in entries
            ],
            "stats": iframe_stats(table),
        }
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "quality": quality,
        "codec": {**codec_info, "weights_sha256": digest},
        "shards": str(shard_root),
        "splits": splits,
        "totals": {
            "clips": sum(s["clips"] for s in splits.values()),
            "bits": sum(s["stats"].get("bits", 0) for s in splits.values()),
        },
    }


def iframe_side_by_side(
    shard_dir: str | os.PathLike[str], iframe_dir: str | os.PathLike[str], count: int
) -> np.ndarray:
    """The first ``count`` clips of a split: original im1 (top row) over the decoded I-frame
    (bottom row), as one uint8 image for MLflow. ``iframe_dir`` is the split folder."""
    from pipeline.data.datasets import frames_to_tensor
    from pipeline.train.runner_utils import image_grid

    fs, items = _plan_pairs(shard_dir, iframe_dir, None)
    originals: list[np.ndarray] = []
    decoded: list[np.ndarray] = []
    settings = {"crop": None, "random_flip": False, "seed": 0, "epoch": 0, "num_frames": 1}
    for item in items:
        if len(originals) >= count:
            break
        batch = next(_read_pair(item, fs=fs, batch_size=count, with_clip_id=False, **settings))
        for frames, iframe in zip(batch["frames"], batch["iframe"], strict=True):
            # one grid needs one size
            if len(originals) < count and (not originals or iframe.shape == decoded[0].shape):
                originals.append(frames[0])
                decoded.append(iframe)
    if not originals:
        raise IFrameError(f"no clips in {shard_dir}")
    return image_grid(
        frames_to_tensor(np.stack(originals)), frames_to_tensor(np.stack(decoded)), max_items=count
    )
