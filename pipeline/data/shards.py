"""Vimeo-90k septuplets to Parquet shards (the ``shard`` stage): one septuplet per row, PNG
bytes kept as they are, every frame checked, bad clips skipped and counted, a re-run keeping
the shards whose plan is unchanged. Schema and manifest: ``docs/data.md``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from pipeline.data.png_check import check_clip
from pipeline.data.vimeo_layout import FRAMES_PER_CLIP, SPLIT_LISTS
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, is_temp_name, write_json_atomic

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "SEPTUPLET_SCHEMA",
    "ShardError",
    "list_shards",
    "log",
    "shard_septuplets",
]


log = logging.getLogger(__name__)


FORMAT_NAME = "plvc-septuplet"


FORMAT_VERSION = 1


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
            checked = check_clip(raw / "sequences" / clip_id, task.expected_size, task.verify)
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
