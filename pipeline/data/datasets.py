"""Readers of the septuplet shards (:data:`pipeline.data.shards.SEPTUPLET_SCHEMA`).

Two views of the same clips:

- :func:`read_septuplets_ray`: a ``ray.data.Dataset`` for Ray Train (streams shards from a
  local folder or shared storage such as ``s3://``, decodes in Ray tasks);
- :class:`SeptupletShards`: a ``torch.utils.data.Dataset`` for single-process use
  (evaluation, tests, a plain ``DataLoader``).

Both decode the stored PNG bytes to RGB, keep the first ``num_frames`` frames and, when asked,
cut the same random crop window (and the same horizontal flip) from every frame of a clip.
The window is drawn from a generator seeded by ``(seed, epoch, clip_id)`` (:func:`clip_rng`),
so a re-run, another worker count or the other reader gives the same crops.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from torch.utils.data import Dataset

from pipeline.data.vimeo_layout import FRAMES_PER_CLIP, SPLIT_LISTS

if TYPE_CHECKING:
    import ray.data
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ray.data
from pipeline.data.clips import (
    READ_COLUMNS,
    batch_to_tensor,
    binary_views,
    check_crop,
    check_num_frames,
    clip_rng,
    decode_clip,
    draw_window,
    is_uri,
)

__all__ = [
    "SeptupletShards",
    "read_encoded_septuplets_ray",
    "read_septuplets_ray",
    "spread_indices",
]


def spread_indices(n: int, count: int) -> list[int]:
    """Up to ``count`` indices of ``range(n)`` spread evenly from first to last: clips of
    every source video of a split in shard order, not only the first video's."""
    k = min(count, n)
    return sorted({round(i) for i in np.linspace(0, n - 1, k)}) if k > 0 else []


def _decode_table(
    table: pa.Table,
    *,
    crop: tuple[int, int] | None,
    random_flip: bool,
    seed: int,
    epoch: int,
    num_frames: int,
    with_clip_id: bool = True,
) -> dict[str, np.ndarray]:
    """A pyarrow batch of shard rows -> {"clip_id": str [B], "frames": uint8 [B,T,h,w,3]}."""
    clip_ids = table.column("clip_id").to_pylist()
    heights = table.column("height").to_numpy()
    widths = table.column("width").to_numpy()
    frames_col = table.column("frames").combine_chunks()
    data, offsets = binary_views(frames_col)
    clips = []
    for i, clip_id in enumerate(clip_ids):
        h, w = int(heights[i]), int(widths[i])
        try:
            window = draw_window(h, w, crop, clip_rng(seed, clip_id, epoch), random_flip)
        except ValueError as exc:
            raise ValueError(f"clip {clip_id}: {exc}") from exc
        clips.append(
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
    if clips and all(c.shape == clips[0].shape for c in clips):
        stacked = np.stack(clips)
    else:
        # frames of different sizes and no crop: Ray keeps them as a variable-shape column
        stacked = np.empty(len(clips), dtype=object)
        stacked[:] = clips
    if not with_clip_id:
        return {"frames": stacked}
    return {"clip_id": np.array(clip_ids, dtype=object), "frames": stacked}


def read_septuplets_ray(
    shard_dir: str | os.PathLike[str] | Sequence[str],
    *,
    crop: tuple[int, int] | None,
    random_flip: bool,
    seed: int,
    num_frames: int = FRAMES_PER_CLIP,
    epoch: int = 0,
    with_clip_id: bool = True,
    batch_size: int = 16,
    filesystem: pafs.FileSystem | None = None,
) -> ray.data.Dataset:
    """One split's shards as a Ray Dataset of {"clip_id": str, "frames": uint8 [T, h, w, 3]}.

    ``read_parquet`` streams the shards; ``map_batches`` decodes each batch straight from its
    Arrow buffers (``batch_format="pyarrow"``, no Python copy of the PNG bytes) and returns
    numpy columns. Training code turns a batch into model input with :func:`batch_to_tensor`.

    Args:
        shard_dir: a split folder (``data/shards/train``), a shard file, or a list of them;
            local paths or URIs Ray's readers take (``s3://``, ``gs://``, ...).
        crop: ``(height, width)`` of the aligned random crop, or None for whole frames.
        random_flip: mirror all frames of a clip horizontally with probability 1/2.
        seed: with ``epoch`` and the clip id, fixes each clip's crop and flip.
        num_frames: keep the first ``num_frames`` of the seven frames.
        epoch: pass the epoch number to draw fresh crops per epoch, reproducibly.
        with_clip_id: keep the string ``clip_id`` column; False leaves only ``frames``, which
            ``iter_torch_batches`` converts (it cannot convert strings).
        batch_size: clips decoded per Ray task batch (bounds the task's memory).
        filesystem: a pyarrow filesystem for the paths (default: inferred from them).
    """
    check_num_frames(num_frames)
    check_crop(crop)
    ds = read_encoded_septuplets_ray(shard_dir, filesystem=filesystem)
    return ds.map_batches(
        _decode_table,
        batch_format="pyarrow",
        batch_size=batch_size,
        fn_kwargs={
            "crop": tuple(crop) if crop is not None else None,
            "random_flip": random_flip,
            "seed": seed,
            "epoch": epoch,
            "num_frames": num_frames,
            "with_clip_id": with_clip_id,
        },
        udf_modifying_row_count=False,
    )


def read_encoded_septuplets_ray(
    shard_dir: str | os.PathLike[str] | Sequence[str],
    *,
    filesystem: pafs.FileSystem | None = None,
) -> ray.data.Dataset:
    """One split's shards as a Ray Dataset of still-encoded clips:
    ``{"clip_id": str, "height": int, "width": int, "frames": the seven PNGs as bytes}``.

    For training code that uses a few frames of each clip (HiFiC draws one image per clip
    per step): it decodes only those, with :func:`decode_png_rgb`, where decoding all seven
    in the reader would spend 7x the PNG work (PNG decoding dominates reading, see
    ``benchmarks/shard_io.py``). Arguments as :func:`read_septuplets_ray`.
    """
    import ray.data

    if isinstance(shard_dir, str | os.PathLike):
        paths: str | list[str] = _absolute(os.fspath(shard_dir))
        if not is_uri(paths):
            _refuse_shard_root(paths)
    else:
        paths = [_absolute(os.fspath(p)) for p in shard_dir]
    return ray.data.read_parquet(paths, filesystem=filesystem).select_columns(READ_COLUMNS)


def _absolute(path: str) -> str:
    # Ray tasks may run with another working directory (ray job submit --working-dir)
    return path if is_uri(path) else os.path.abspath(path)


def _refuse_shard_root(path: str) -> None:
    if os.path.isdir(path) and any(os.path.isdir(os.path.join(path, s)) for s in SPLIT_LISTS):
        raise ValueError(
            f"{path} holds the split folders {sorted(SPLIT_LISTS)}: pass one of them, "
            f"e.g. {os.path.join(path, 'train')}"
        )


class SeptupletShards(Dataset):
    """One split's shards as a map-style torch Dataset.

    Item ``i``: ``{"clip_id": str, "frames": float32 tensor [T, 3, h, w] in [0, 1]}``, clips in
    shard order (sorted by clip id). Opening reads only the ``clip_id`` column; an item reads
    its whole row group (Parquet's unit of reading) and keeps the last one, so sequential
    access (evaluation, ``shuffle=False``) reads each row group once per worker. For shuffled
    training use :func:`read_septuplets_ray`, which streams whole row groups.

    Args:
        shard_dir: a split folder or a URI pyarrow understands (``s3://bucket/shards/test``).
        crop: ``(height, width)`` aligned random crop, or None for whole frames.
        random_flip: mirror all frames of a clip horizontally with probability 1/2.
        seed, epoch: fix each clip's crop and flip together with its id (as the Ray reader).
        num_frames: keep the first ``num_frames`` of the seven frames.
    """

    def __init__(
        self,
        shard_dir: str | os.PathLike[str],
        *,
        crop: tuple[int, int] | None = None,
        random_flip: bool = False,
        seed: int = 0,
        num_frames: int = FRAMES_PER_CLIP,
        epoch: int = 0,
    ) -> None:
        check_num_frames(num_frames)
        check_crop(crop)
        self.crop = tuple(crop) if crop is not None else None
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = epoch
        self.num_frames = num_frames
        source = os.fspath(shard_dir)
        if is_uri(source):
            self._fs, root = pafs.FileSystem.from_uri(source)
        else:
            _refuse_shard_root(source)
            self._fs, root = pafs.LocalFileSystem(), os.path.abspath(source)
        infos = self._fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        self.files = sorted(
            i.path
            for i in infos
            if i.is_file and i.base_name.endswith(".parquet") and not i.base_name.startswith(".")
        )
        if not self.files:
            raise FileNotFoundError(f"no Parquet shards in {source}")
        clip_ids: list[str] = []
        locations: list[tuple[int, int, int]] = []
        for file_index, path in enumerate(self.files):
            with self._fs.open_input_file(path) as handle:
                pfile = pq.ParquetFile(handle)
                missing = set(READ_COLUMNS) - set(pfile.schema_arrow.names)
                if missing:
                    raise ValueError(f"{path}: not a septuplet shard, no column(s) {missing}")
                for rg in range(pfile.num_row_groups):
                    ids = pfile.read_row_group(rg, columns=["clip_id"]).column(0).to_pylist()
                    clip_ids.extend(ids)
                    locations.extend((file_index, rg, row) for row in range(len(ids)))
        self.clip_ids = clip_ids
        self._locations = np.asarray(locations, dtype=np.int64).reshape(-1, 3)
        self._reset_handles()

    def _reset_handles(self) -> None:
        self._pid = os.getpid()
        self._open: dict[int, pq.ParquetFile] = {}
        self._cached_key: tuple[int, int] | None = None
        self._cached: tuple[pa.Table, np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"], state["_cached_key"], state["_cached"] = {}, None, None
        return state

    def __len__(self) -> int:
        return len(self.clip_ids)

    def _row_group(self, file_index: int, rg: int) -> tuple[pa.Table, np.ndarray, np.ndarray]:
        if os.getpid() != self._pid:  # a forked DataLoader worker: own handles
            self._reset_handles()
        if self._cached_key != (file_index, rg):
            pfile = self._open.get(file_index)
            if pfile is None:
                pfile = pq.ParquetFile(self._fs.open_input_file(self.files[file_index]))
                self._open[file_index] = pfile
            table = pfile.read_row_group(rg, columns=READ_COLUMNS)
            data, offsets = binary_views(table.column("frames").combine_chunks())
            self._cached_key, self._cached = (file_index, rg), (table, data, offsets)
        assert self._cached is not None
        return self._cached

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} clips")
        file_index, rg, row = (int(v) for v in self._locations[index])
        table, data, offsets = self._row_group(file_index, rg)
        clip_id = self.clip_ids[index]
        h = int(table.column("height")[row].as_py())
        w = int(table.column("width")[row].as_py())
        rng = clip_rng(self.seed, clip_id, self.epoch) if (self.crop or self.random_flip) else None
        try:
            window = draw_window(h, w, self.crop, rng, self.random_flip)
        except ValueError as exc:
            raise ValueError(f"clip {clip_id}: {exc}") from exc
        frames = decode_clip(
            data,
            offsets,
            row,
            clip_id=clip_id,
            height=h,
            width=w,
            num_frames=self.num_frames,
            window=window,
        )
        return {"clip_id": clip_id, "frames": batch_to_tensor(frames)}
