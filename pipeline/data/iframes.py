"""The ``iframes@<quality>`` stage's work: frame 1 of every clip coded once with HiFiC on a Ray
Data actor pool (:func:`code_iframes`), written aligned with the shards in the format of
``docs/data.md``; a re-run keeps the files that are complete for the same shards and weights.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from pipeline.data.vimeo_layout import FRAMES_PER_CLIP, SPLIT_LISTS

if TYPE_CHECKING:
    pass
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.io import atomic_path, is_temp_name, write_json_atomic

if TYPE_CHECKING:
    pass
from pipeline.data.clips import READ_COLUMNS, binary_views, decode_png_rgb
from pipeline.data.iframe_files import (
    FORMAT_NAME,
    FORMAT_VERSION,
    IFRAME_SCHEMA,
    MANIFEST_NAME,
    PART_RE,
    PNG_COMPRESSION,
    IFrameError,
    file_metadata,
    list_parts,
    row_group_sizes,
)
from pipeline.data.training_clips import plan_pairs, read_iframe_columns, read_pair

__all__ = [
    "IFrameCoder",
    "code_iframes",
    "encode_png_rgb",
    "iframe_side_by_side",
    "iframe_stats",
    "log",
]


log = logging.getLogger(__name__)


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


def _first_frames(batch: dict[str, np.ndarray], *, fs: pafs.FileSystem) -> dict[str, Any]:
    """Shard row group -> its clips' im1 PNG bytes (only those go on to the coders)."""
    path, rg, start = str(batch["path"][0]), int(batch["row_group"][0]), int(batch["row_start"][0])
    with fs.open_input_file(path) as handle:
        table = pq.ParquetFile(handle).read_row_group(rg, columns=READ_COLUMNS)
    data, offsets = binary_views(table.column("frames").combine_chunks())
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

        from plvc.intra import get_intra_codec

        if device == "cpu":
            torch.set_num_threads(threads)
        blob = ray.get(weights[0]) if not isinstance(weights[0], bytes | str) else weights[0]
        options = {"weights_sha256": sha256, "device": device}
        if isinstance(blob, str):  # a path every node sees
            self.codec = get_intra_codec("hific", weights=blob, **options)
            return
        # the weights travel through the object store: no shared file system needed
        self.codec = get_intra_codec("hific", weights_data=blob, **options)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:

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
    kv = file_metadata(meta)
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
        if is_temp_name(path.name) or (PART_RE.match(path.name) and path.name not in planned):
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
        shards = [Path(p) for p in list_parts(pafs.LocalFileSystem(), str(shard_root / split))]
        if not shards:
            raise IFrameError(f"no shard files in {shard_root / split}: run the shard stage first")
        _remove_stale(out_dir / split, {s.name for s in shards})
        plans[split] = []
        for shard in shards:
            meta = pq.read_metadata(shard)
            plan = file_metadata(meta).get("plvc.plan")
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
                "row_groups": row_group_sizes(meta),
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
    # absolute: Ray's tasks run in the cluster's folder, not in this stage's
    by_source = {os.path.abspath(e["shard"]): e for e in pending}
    items = []
    for source, e in by_source.items():
        start = 0
        for rg, n in enumerate(e["row_groups"]):
            items.append({"path": source, "row_group": rg, "row_start": start})
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
    from pipeline.data.datasets import batch_to_tensor
    from pipeline.images import image_grid

    fs, items = plan_pairs(shard_dir, iframe_dir, None)
    originals: list[np.ndarray] = []
    decoded: list[np.ndarray] = []
    settings = {"crop": None, "random_flip": False, "seed": 0, "epoch": 0, "num_frames": 1}
    for item in items:
        if len(originals) >= count:
            break
        batch = next(read_pair(item, fs=fs, batch_size=count, with_clip_id=False, **settings))
        for frames, iframe in zip(batch["frames"], batch["iframe"], strict=True):
            # one grid needs one size
            if len(originals) < count and (not originals or iframe.shape == decoded[0].shape):
                originals.append(frames[0])
                decoded.append(iframe)
    if not originals:
        raise IFrameError(f"no clips in {shard_dir}")
    return image_grid(
        batch_to_tensor(np.stack(originals)), batch_to_tensor(np.stack(decoded)), max_items=count
    )
