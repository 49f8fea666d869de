"""Vimeo-90k septuplets to Parquet shards (the ``shard`` stage's machinery).

Input: a raw folder in Vimeo-90k septuplet layout::

    <raw>/sequences/00001/0001/im1.png ... im7.png
    <raw>/sep_trainlist.txt     one clip id ("00001/0001") per line, blank lines ignored
    <raw>/sep_testlist.txt

Output (``out_dir``)::

    train/part-00000.parquet ...    one septuplet per row, schema SEPTUPLET_SCHEMA
    test/part-00000.parquet ...
    manifest.json                   written last: its presence means the stage finished

Row schema (:data:`SEPTUPLET_SCHEMA`, schema metadata ``plvc.format`` = ``"plvc-septuplet"``,
``plvc.format_version`` = ``"1"``):

``clip_id`` (string)
    The clip's id as listed, ``"<sequence>/<clip>"``, e.g. ``"00001/0001"``; the folder
    ``sequences/<clip_id>`` it came from. Rows are sorted by it within and across shards.
``height``, ``width`` (int32)
    Size in pixels shared by all seven frames (256 x 448 for Vimeo-90k).
``frames`` (fixed-size list of 7 binary)
    The bytes of ``im1.png`` ... ``im7.png`` exactly as on disk, in temporal order: never
    re-encoded, so a reader decodes exactly the pixels of the raw dataset. Every frame was
    checked at shard time: a PNG that OpenCV decodes to 8-bit, 3 channels, all seven frames
    the same size (or, with ``verify="structure"``, its chunks' CRCs and header agree).

Shards are planned as contiguous chunks of ``rows_per_shard`` listed clips of the sorted,
de-duplicated clip list; a shard holds fewer rows when some of its clips were skipped. Each
shard is written by one worker process in row groups of ``row_group_rows`` rows, under a
hidden temporary name, then renamed. Its Parquet key-value metadata records ``plvc.plan``, a
hash of the shard's clip ids, their frame files' sizes and the shard parameters, so a re-run
keeps a shard whose plan is unchanged and rewrites only missing or stale ones.

``manifest.json`` fields:

``format``, ``format_version``
    As the schema metadata.
``raw_root``
    The raw folder, as given.
``params``
    ``rows_per_shard``, ``row_group_rows``, ``max_skipped_fraction``, ``expected_size``
    (``[height, width]`` or null), ``verify`` (``"decode"`` or ``"structure"``).
``ok``, ``errors``
    Whether the stage succeeded, and why not (one message per failing split).
``splits.<train|test>``
    ``list_file`` (name of the clip list), ``listed`` (non-blank lines), ``clips`` (rows
    written), ``skipped`` (listed lines not written), ``skipped_fraction``
    (``skipped / listed``), ``png_bytes`` (frame bytes stored), ``file_bytes`` (size of the
    Parquet files), ``shards`` (number of files), ``frame_sizes`` (``{"<H>x<W>": clips}``),
    ``files`` (per shard: ``path`` relative to ``out_dir``, ``clips``, ``row_groups``,
    ``png_bytes``, ``file_bytes``, ``first_clip``, ``last_clip``, ``plan``), and
    ``skipped_clips`` (``{"clip_id", "reason"}`` for each skipped line, sorted by clip id).
``totals``
    ``clips``, ``skipped``, ``png_bytes``, ``file_bytes``, ``shards`` over both splits.

The manifest holds no timestamps: the same input and parameters give the same manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import threading
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipeline.errors import PipelineError
from pipeline.io import atomic_path, is_temp_name, write_json_atomic

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FRAMES_PER_CLIP",
    "SEPTUPLET_SCHEMA",
    "SPLIT_LISTS",
    "ShardError",
    "list_shards",
    "shard_septuplets",
]

log = logging.getLogger(__name__)

FORMAT_NAME = "plvc-septuplet"
FORMAT_VERSION = 1
FRAMES_PER_CLIP = 7
#: split name -> clip list file in the raw folder
SPLIT_LISTS: dict[str, str] = {"train": "sep_trainlist.txt", "test": "sep_testlist.txt"}

SEPTUPLET_SCHEMA = pa.schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("frames", pa.list_(pa.binary(), FRAMES_PER_CLIP), nullable=False),
    ],
    metadata={"plvc.format": FORMAT_NAME, "plvc.format_version": str(FORMAT_VERSION)},
)

MANIFEST_NAME = "manifest.json"
_SHARD_NAME = "part-{:05d}.parquet"
_SHARD_RE = re.compile(r"^part-\d{5,}\.parquet$")
# "<sequence>/<clip>" with plain name characters: nothing that could climb out of sequences/
_CLIP_ID_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*/[A-Za-z0-9_-][A-Za-z0-9_.-]*$")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# an Arrow binary array addresses its values with int32 offsets
_MAX_BINARY_BYTES = 2**31 - 1
# how many checked clips a worker batches into one progress message
_PROGRESS_EVERY = 8


class ShardError(PipelineError):
    """The raw folder cannot be sharded (missing lists, or too many bad clips)."""


@dataclass(frozen=True)
class _ShardTask:
    split: str
    index: int
    clip_ids: tuple[str, ...]
    raw_root: str
    out_dir: str
    rows_per_shard: int
    row_group_rows: int
    expected_size: tuple[int, int] | None
    verify: str

    @property
    def rel_path(self) -> str:
        return f"{self.split}/{_SHARD_NAME.format(self.index)}"


def shard_septuplets(
    raw_root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    rows_per_shard: int,
    row_group_rows: int,
    max_skipped_fraction: float,
    workers: int = 0,
    progress: bool = True,
    expected_size: tuple[int, int] | None = None,
    verify: Literal["decode", "structure"] = "decode",
) -> dict[str, Any]:
    """Check every listed septuplet of ``raw_root`` and write the good ones as Parquet shards.

    Args:
        raw_root: folder in Vimeo-90k septuplet layout (see the module docstring).
        out_dir: where ``{train,test}/part-*.parquet`` and ``manifest.json`` go.
        rows_per_shard: listed clips per shard (a shard holds fewer when clips are skipped).
        row_group_rows: rows per Parquet row group.
        max_skipped_fraction: a split fails when a larger share of its listed clips is skipped.
        workers: worker processes; 0 means one per available core, 1 runs in this process.
        progress: show a tqdm progress bar (clips checked).
        expected_size: ``(height, width)`` every frame must have; None accepts any size
            shared by a clip's seven frames.
        verify: how each frame is checked. ``"decode"``: OpenCV decodes it. ``"structure"``:
            its PNG chunks are parsed and every chunk's CRC-32 checked (size, 8-bit, RGB
            from the header), ~30x faster than a decode; it catches truncated, corrupted and
            foreign files, but not a deflate stream that was wrong before its CRC was
            computed (a broken encoder).

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).

    Raises:
        ShardError: a clip list or ``sequences/`` is missing, or a split has no valid clip
            or more than ``max_skipped_fraction`` of it skipped. In the latter cases the
            shards and the manifest (``ok: false``) are written first.
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    if row_group_rows < 1:
        raise ValueError(f"row_group_rows must be >= 1, got {row_group_rows}")
    if not 0.0 <= max_skipped_fraction <= 1.0:
        raise ValueError(f"max_skipped_fraction must be in [0, 1], got {max_skipped_fraction}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if verify not in ("decode", "structure"):
        raise ValueError(f"verify must be 'decode' or 'structure', got {verify!r}")
    if expected_size is not None:
        expected_size = (int(expected_size[0]), int(expected_size[1]))

    raw = Path(raw_root)
    out = Path(out_dir)
    if not (raw / "sequences").is_dir():
        raise ShardError(f"{raw}: no 'sequences' folder: not a Vimeo-90k septuplet layout")
    listed: dict[str, list[str]] = {}
    for split, list_name in SPLIT_LISTS.items():
        list_path = raw / list_name
        try:
            text = list_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ShardError(f"{list_path}: cannot read clip list: {exc.strerror or exc}") from exc
        listed[split] = [line.strip() for line in text.splitlines() if line.strip()]

    planned_ids, early_skips = _plan_clips(listed)
    tasks: list[_ShardTask] = []
    for split, ids in planned_ids.items():
        for index, start in enumerate(range(0, len(ids), rows_per_shard)):
            tasks.append(
                _ShardTask(
                    split=split,
                    index=index,
                    clip_ids=tuple(ids[start : start + rows_per_shard]),
                    raw_root=str(raw),
                    out_dir=str(out),
                    rows_per_shard=rows_per_shard,
                    row_group_rows=row_group_rows,
                    expected_size=expected_size,
                    verify=verify,
                )
            )

    manifest_path = out / MANIFEST_NAME
    # the manifest marks a finished run: a stale one must not outlive an interrupted re-run
    manifest_path.unlink(missing_ok=True)
    _remove_stale_files(out, {t.rel_path for t in tasks})

    n_workers = workers or _available_cores()
    results = _run_tasks(tasks, n_workers, progress, total=sum(len(t.clip_ids) for t in tasks))

    manifest = _build_manifest(
        raw=raw,
        listed=listed,
        early_skips=early_skips,
        results=results,
        params={
            "rows_per_shard": rows_per_shard,
            "row_group_rows": row_group_rows,
            "max_skipped_fraction": max_skipped_fraction,
            "expected_size": list(expected_size) if expected_size else None,
            "verify": verify,
        },
        max_skipped_fraction=max_skipped_fraction,
    )
    write_json_atomic(manifest_path, manifest)
    kept = sum(r["status"] == "kept" for r in results)
    log.info(
        "sharded %d clips into %d shards (%d kept from a previous run), %d skipped",
        manifest["totals"]["clips"],
        manifest["totals"]["shards"],
        kept,
        manifest["totals"]["skipped"],
    )
    if not manifest["ok"]:
        raise ShardError("; ".join(manifest["errors"]) + f" (details in {manifest_path})")
    return manifest


def list_shards(split_dir: str | os.PathLike[str]) -> list[Path]:
    """The finished shard files of one split folder, in order."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        return []
    return sorted(p for p in split_dir.iterdir() if _SHARD_RE.match(p.name))


# --- planning ----------------------------------------------------------------------------


def _plan_clips(
    listed: dict[str, list[str]],
) -> tuple[dict[str, list[str]], dict[str, list[dict[str, str]]]]:
    """Sorted unique well-formed ids per split, and the lines skipped before any file is read."""
    planned: dict[str, list[str]] = {}
    skips: dict[str, list[dict[str, str]]] = {}
    seen_in: dict[str, str] = {}
    for split, lines in listed.items():
        list_name = SPLIT_LISTS[split]
        ids: set[str] = set()
        skips[split] = []
        for clip_id in lines:
            if not _CLIP_ID_RE.match(clip_id) or ".." in clip_id:
                reason = f"malformed clip id in {list_name} (expected '<sequence>/<clip>')"
            elif clip_id in ids:
                reason = f"listed twice in {list_name}"
            elif clip_id in seen_in:
                # a clip in both lists would leak test data into training: keep the first use
                reason = f"also listed in {SPLIT_LISTS[seen_in[clip_id]]} (split overlap)"
            else:
                ids.add(clip_id)
                continue
            skips[split].append({"clip_id": clip_id, "reason": reason})
        for clip_id in ids:
            seen_in[clip_id] = split
        planned[split] = sorted(ids)
    return planned, skips


def _remove_stale_files(out: Path, planned: set[str]) -> None:
    for split in SPLIT_LISTS:
        split_dir = out / split
        if not split_dir.is_dir():
            continue
        for path in split_dir.iterdir():
            rel = f"{split}/{path.name}"
            if is_temp_name(path.name) or (_SHARD_RE.match(path.name) and rel not in planned):
                log.info("removing stale %s", path)
                path.unlink()


# --- running -----------------------------------------------------------------------------


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _run_tasks(
    tasks: list[_ShardTask], workers: int, progress: bool, total: int
) -> list[dict[str, Any]]:
    bar = tqdm(total=total, unit="clip", desc="shard", disable=not progress, smoothing=0.05)
    try:
        if min(workers, len(tasks)) <= 1:
            return [_write_shard(task, bar.update) for task in tasks]
        return _run_pool(tasks, min(workers, len(tasks)), bar)
    finally:
        bar.close()


def _run_pool(tasks: list[_ShardTask], workers: int, bar: Any) -> list[dict[str, Any]]:
    # spawn, not fork: the caller may hold threads (MLflow, tqdm, Arrow's pools) whose locks a
    # forked child would inherit mid-use. Each spawned worker imports the caller's main module:
    # a CLI that calls this should import heavy packages (torch, mlflow) inside its main().
    ctx = mp.get_context("spawn")
    updates = ctx.Queue()

    def pump() -> None:
        while (n := updates.get()) is not None:  # None: the pool is done
            bar.update(n)

    pump_thread = threading.Thread(target=pump, daemon=True)
    pump_thread.start()
    try:
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(updates,)
        ) as pool:
            futures: dict[Future[dict[str, Any]], _ShardTask] = {}
            try:
                for task in tasks:
                    futures[pool.submit(_write_shard, task)] = task
            except BrokenProcessPool as exc:
                raise ShardError(f"a shard worker process died: {exc}") from exc
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in done:
                if (error := future.exception()) is not None:
                    for other in futures:
                        other.cancel()
                    hint = (
                        " (out of memory? lower workers)"
                        if isinstance(error, BrokenProcessPool)
                        else ""
                    )
                    raise ShardError(
                        f"writing shard {futures[future].rel_path} failed: {error}{hint}"
                    ) from error
            return [f.result() for f in futures]
    finally:
        updates.put(None)
        pump_thread.join(timeout=5)


_progress: Callable[[int], Any] | None = None


def _init_worker(updates: Any) -> None:
    global _progress
    cv2.setNumThreads(1)  # one process per core already
    _progress = updates.put


def _write_shard(task: _ShardTask, report: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Check one planned shard's clips and write it (or keep the file a previous run wrote)."""
    report = report or _progress or (lambda n: None)
    raw = Path(task.raw_root)
    final = Path(task.out_dir) / task.rel_path
    plan = _plan_hash(task, raw)
    kept = _read_kept(final, plan)
    if kept is not None:
        report(len(task.clip_ids))
        return kept

    with atomic_path(final) as tmp:
        return _write_checked_clips(task, raw, final, tmp, plan, report)


def _write_checked_clips(
    task: _ShardTask,
    raw: Path,
    final: Path,
    tmp: Path,
    plan: str,
    report: Callable[[int], Any],
) -> dict[str, Any]:
    writer: pq.ParquetWriter | None = None
    skipped: list[dict[str, str]] = []
    sizes: Counter[str] = Counter()
    rows: list[tuple[str, int, int, list[bytes]]] = []
    n_rows = png_bytes = row_groups = 0
    first_clip = last_clip = None
    pending = 0

    def flush() -> None:
        nonlocal writer, n_rows, png_bytes, row_groups
        writer = _flush(rows, writer, tmp, task)
        png_bytes += sum(len(b) for r in rows for b in r[3])
        n_rows += len(rows)
        row_groups += 1
        rows.clear()

    try:
        for clip_id in task.clip_ids:
            checked = _check_clip(raw / "sequences" / clip_id, task.expected_size, task.verify)
            pending += 1
            if pending >= _PROGRESS_EVERY:
                report(pending)
                pending = 0
            if isinstance(checked, str):
                skipped.append({"clip_id": clip_id, "reason": checked})
                continue
            frames, (h, w) = checked
            rows.append((clip_id, h, w, frames))
            sizes[f"{h}x{w}"] += 1
            first_clip = first_clip or clip_id
            last_clip = clip_id
            if len(rows) == task.row_group_rows:
                flush()
        if rows:
            flush()
        report(pending)

        summary = {
            "split": task.split,
            "index": task.index,
            "path": task.rel_path,
            "clips": n_rows,
            "row_groups": row_groups,
            "png_bytes": png_bytes,
            "first_clip": first_clip,
            "last_clip": last_clip,
            "plan": plan,
            "skipped_clips": skipped,
            "frame_sizes": dict(sorted(sizes.items())),
        }
        if writer is None:
            # every clip of this chunk was bad: no empty file, and no stale one either
            tmp.unlink()
            final.unlink(missing_ok=True)
            return {**summary, "path": None, "file_bytes": 0, "status": "empty"}
        writer.add_key_value_metadata({"plvc.plan": plan, "plvc.summary": json.dumps(summary)})
        writer.close()
        writer = None
    finally:
        if writer is not None:
            writer.close()
    return {**summary, "file_bytes": tmp.stat().st_size, "status": "written"}


def _flush(
    rows: list[tuple[str, int, int, list[bytes]]],
    writer: pq.ParquetWriter | None,
    tmp: Path,
    task: _ShardTask,
) -> pq.ParquetWriter:
    total = sum(len(b) for r in rows for b in r[3])
    if total > _MAX_BINARY_BYTES:
        raise ShardError(
            f"{task.rel_path}: a row group of {len(rows)} clips holds {total} frame bytes, over "
            f"Arrow's 2 GiB per array; lower row_group_rows (now {task.row_group_rows})"
        )
    values = pa.array([b for r in rows for b in r[3]], type=pa.binary())
    table = pa.Table.from_arrays(
        [
            pa.array([r[0] for r in rows], type=pa.string()),
            pa.array([r[1] for r in rows], type=pa.int32()),
            pa.array([r[2] for r in rows], type=pa.int32()),
            pa.FixedSizeListArray.from_arrays(values, FRAMES_PER_CLIP),
        ],
        schema=SEPTUPLET_SCHEMA,
    )
    if writer is None:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        writer = pq.ParquetWriter(
            tmp,
            SEPTUPLET_SCHEMA,
            # PNG is already deflated: compressing again costs CPU and saves nothing
            compression="none",
            use_dictionary=False,
            write_statistics=["clip_id", "height", "width"],
        )
    writer.write_table(table, row_group_size=len(rows))
    return writer


def _plan_hash(task: _ShardTask, raw: Path) -> str:
    """Identity of a shard's content: its clips, their files' sizes, and the shard params."""
    digest = hashlib.sha256()
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "rows_per_shard": task.rows_per_shard,
        "row_group_rows": task.row_group_rows,
        "expected_size": task.expected_size,
        "verify": task.verify,
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for clip_id in task.clip_ids:
        clip_dir = raw / "sequences" / clip_id
        file_sizes = []
        for k in range(1, FRAMES_PER_CLIP + 1):
            try:
                file_sizes.append(os.stat(clip_dir / f"im{k}.png").st_size)
            except OSError:
                file_sizes.append(-1)
        digest.update(f"{clip_id}:{file_sizes}\n".encode())
    return digest.hexdigest()


def _read_kept(final: Path, plan: str) -> dict[str, Any] | None:
    """The summary of a shard a previous run finished with the same plan, else None."""
    if not final.exists():
        return None
    try:
        meta = pq.read_metadata(final).metadata or {}
        if meta.get(b"plvc.plan", b"").decode() != plan:
            return None
        summary = json.loads(meta[b"plvc.summary"])
    except (OSError, pa.ArrowException, KeyError, ValueError):
        return None  # unreadable or foreign file: rewrite it
    return {**summary, "file_bytes": final.stat().st_size, "status": "kept"}


def _check_clip(
    clip_dir: Path, expected_size: tuple[int, int] | None, verify: str = "decode"
) -> tuple[list[bytes], tuple[int, int]] | str:
    """The seven frames' file bytes and (height, width), or why the clip is unusable."""
    inspect = _inspect_decoded if verify == "decode" else _inspect_structure
    frames: list[bytes] = []
    size: tuple[int, int] | None = None
    for k in range(1, FRAMES_PER_CLIP + 1):
        name = f"im{k}.png"
        try:
            data = (clip_dir / name).read_bytes()
        except FileNotFoundError:
            return f"missing {name}"
        except OSError as exc:
            return f"cannot read {name}: {exc.strerror or exc}"
        if not data.startswith(_PNG_SIGNATURE):
            return f"{name} is not a PNG file ({len(data)} bytes)"
        info = inspect(data)
        if isinstance(info, str):
            return f"{name} is corrupt: {info} ({len(data)} bytes)"
        height, width, channels, bits = info
        if bits != 8:
            return f"{name} has {bits}-bit samples, expected 8-bit"
        if channels != 3:
            return f"{name} has {channels} channel(s), expected 3 (RGB)"
        if size is None:
            size = (height, width)
            if expected_size is not None and size != expected_size:
                want_h, want_w = expected_size
                return f"{name} is {width}x{height} (WxH), expected {want_w}x{want_h}"
        elif (height, width) != size:
            return f"{name} is {width}x{height} (WxH) but im1.png is {size[1]}x{size[0]}"
        frames.append(data)
    assert size is not None
    return frames, size


def _inspect_decoded(data: bytes) -> tuple[int, int, int, int] | str:
    """(height, width, channels, bits per sample) of the image OpenCV decodes."""
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        image = None
    if image is None:
        return "OpenCV cannot decode it"
    channels = 1 if image.ndim == 2 else image.shape[2]
    return int(image.shape[0]), int(image.shape[1]), channels, image.dtype.itemsize * 8


# channels libpng gives per PNG colour type (palette expands to RGB)
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


def _inspect_structure(data: bytes) -> tuple[int, int, int, int] | str:
    """(height, width, channels, bits per sample) from the PNG's chunks, every CRC checked.

    Catches what damages real files (truncation, flipped bytes, foreign data) at a fraction
    of a decode's cost; unlike a decode it trusts a deflate stream whose CRC is right.
    """
    view = memoryview(data)
    pos, end_of_data = len(_PNG_SIGNATURE), len(data)
    header: tuple[int, int, int, int] | None = None
    transparency = has_image = False
    while True:
        if pos + 12 > end_of_data:
            return "truncated (no IEND chunk)"
        length = int.from_bytes(view[pos : pos + 4], "big")
        kind = bytes(view[pos + 4 : pos + 8])
        end = pos + 12 + length
        if end > end_of_data:
            return f"truncated inside a {kind.decode('latin-1')!r} chunk"
        if zlib.crc32(view[pos + 4 : end - 4]) != int.from_bytes(view[end - 4 : end], "big"):
            return f"CRC mismatch in a {kind.decode('latin-1')!r} chunk"
        if header is None:
            if kind != b"IHDR" or length != 13:
                return "first chunk is not IHDR"
            width = int.from_bytes(view[pos + 8 : pos + 12], "big")
            height = int.from_bytes(view[pos + 12 : pos + 16], "big")
            bits, colour = view[pos + 16], view[pos + 17]
            if colour not in _PNG_CHANNELS:
                return f"unknown colour type {colour}"
            header = (height, width, _PNG_CHANNELS[colour], 8 if colour == 3 else bits)
        elif kind == b"tRNS":
            transparency = True
        elif kind == b"IDAT":
            has_image = True
        elif kind == b"IEND":
            break
        pos = end
    if not has_image:
        return "no IDAT chunk"
    height, width, channels, bits = header
    if transparency and channels in (1, 3):  # libpng adds an alpha channel
        channels += 1
    return height, width, channels, bits


# --- manifest ----------------------------------------------------------------------------


def _build_manifest(
    *,
    raw: Path,
    listed: dict[str, list[str]],
    early_skips: dict[str, list[dict[str, str]]],
    results: Iterable[dict[str, Any]],
    params: dict[str, Any],
    max_skipped_fraction: float,
) -> dict[str, Any]:
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLIT_LISTS}
    for r in results:
        by_split[r["split"]].append(r)
    splits: dict[str, Any] = {}
    errors: list[str] = []
    for split, list_name in SPLIT_LISTS.items():
        shard_results = sorted(by_split[split], key=lambda r: r["index"])
        files = [{k: r[k] for k in _FILE_KEYS} for r in shard_results if r["path"] is not None]
        skipped = sorted(
            early_skips[split] + [s for r in shard_results for s in r["skipped_clips"]],
            key=lambda s: (s["clip_id"], s["reason"]),
        )
        sizes: Counter[str] = Counter()
        for r in shard_results:
            sizes.update(r["frame_sizes"])
        n_listed = len(listed[split])
        clips = sum(f["clips"] for f in files)
        fraction = len(skipped) / n_listed if n_listed else 0.0
        splits[split] = {
            "list_file": list_name,
            "listed": n_listed,
            "clips": clips,
            "skipped": len(skipped),
            "skipped_fraction": round(fraction, 6),
            "png_bytes": sum(f["png_bytes"] for f in files),
            "file_bytes": sum(f["file_bytes"] for f in files),
            "shards": len(files),
            "frame_sizes": dict(sorted(sizes.items())),
            "files": files,
            "skipped_clips": skipped,
        }
        if clips == 0:
            why = f": {_reason_summary(skipped)}" if skipped else ""
            errors.append(
                f"split '{split}': no valid clips ({n_listed} listed in {raw / list_name}){why}"
            )
        elif fraction > max_skipped_fraction:
            errors.append(
                f"split '{split}': {len(skipped)} of {n_listed} listed clips skipped "
                f"({fraction:.1%} > max_skipped_fraction {max_skipped_fraction:.1%}): "
                f"{_reason_summary(skipped)}"
            )
    totals = {
        key: sum(s[key] for s in splits.values())
        for key in ("clips", "skipped", "png_bytes", "file_bytes", "shards")
    }
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "raw_root": str(raw),
        "params": params,
        "ok": not errors,
        "errors": errors,
        "splits": splits,
        "totals": totals,
    }


_FILE_KEYS = (
    "path",
    "clips",
    "row_groups",
    "png_bytes",
    "file_bytes",
    "first_clip",
    "last_clip",
    "plan",
)


def _reason_summary(skipped: list[dict[str, str]], limit: int = 3) -> str:
    shown = ", ".join(f"{s['clip_id']} ({s['reason']})" for s in skipped[:limit])
    more = len(skipped) - limit
    return shown + (f" and {more} more" if more > 0 else "")
