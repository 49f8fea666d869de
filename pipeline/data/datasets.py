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

import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from pipeline.data.shards import FRAMES_PER_CLIP, SPLIT_LISTS

if TYPE_CHECKING:
    import ray.data

__all__ = [
    "SeptupletShards",
    "aligned_random_crop",
    "clip_rng",
    "decode_png_rgb",
    "frames_to_tensor",
    "read_encoded_septuplets_ray",
    "read_septuplets_ray",
]

_READ_COLUMNS = ["clip_id", "height", "width", "frames"]


def decode_png_rgb(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """Decode one PNG (any image OpenCV reads) to an (H, W, 3) uint8 RGB array.

    Raises:
        ValueError: ``data`` is empty or not a decodable image.
    """
    buf = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
    if buf.size == 0:
        raise ValueError("cannot decode an image from 0 bytes")
    try:
        image = cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB)
    except cv2.error as exc:
        raise ValueError(f"cannot decode image ({buf.size} bytes): {exc}") from exc
    if image is None:
        head = bytes(buf[:8])
        raise ValueError(f"not a decodable image ({buf.size} bytes, starting {head!r})")
    return image


def clip_rng(seed: int, clip_id: str, epoch: int = 0) -> np.random.Generator:
    """The generator that draws a clip's crop and flip: stable across processes and runs."""
    # Python's hash() is salted per process; a digest is not
    key = int.from_bytes(hashlib.blake2b(clip_id.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, epoch, key])


def _check_crop(crop: tuple[int, int] | None) -> None:
    if crop is not None and (len(crop) != 2 or min(crop) < 1):
        raise ValueError(f"crop must be (height, width) of positive sizes, got {crop!r}")


@dataclass(frozen=True)
class _Window:
    top: int
    left: int
    height: int
    width: int
    flip: bool


def _draw_window(
    height: int,
    width: int,
    crop: tuple[int, int] | None,
    rng: np.random.Generator | None,
    flip: bool,
) -> _Window:
    """The crop window (and flip) for frames of ``height`` x ``width``; draws y, x, then flip."""
    _check_crop(crop)
    if crop is None:
        crop_h, crop_w = height, width
    else:
        crop_h, crop_w = crop
        if crop_h > height:
            raise ValueError(f"crop height {crop_h} is larger than the frame height {height}")
        if crop_w > width:
            raise ValueError(f"crop width {crop_w} is larger than the frame width {width}")
    if rng is None:
        if flip:
            raise ValueError("a random flip needs a generator (rng)")
        return _Window((height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w, False)
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    do_flip = bool(flip and rng.random() < 0.5)
    return _Window(top, left, crop_h, crop_w, do_flip)


def _apply_window(image: np.ndarray, w: _Window) -> np.ndarray:
    view = image[..., w.top : w.top + w.height, w.left : w.left + w.width, :]
    return view[..., ::-1, :] if w.flip else view


def aligned_random_crop(
    frames: np.ndarray,
    crop_h: int,
    crop_w: int,
    rng: np.random.Generator,
    flip: bool,
) -> np.ndarray:
    """Cut one random ``crop_h`` x ``crop_w`` window from all frames of a clip.

    Args:
        frames: (T, H, W, C) array.
        crop_h, crop_w: window size; equal to the frame size means no spatial crop.
        rng: draws the window's top, left, then (if ``flip``) the flip.
        flip: if True, mirror all frames horizontally with probability 1/2 (all or none).

    Returns:
        A contiguous (T, crop_h, crop_w, C) array.

    Raises:
        ValueError: ``frames`` is not 4-D, or the crop is larger than the frames.
    """
    if frames.ndim != 4:
        raise ValueError(f"frames must be (T, H, W, C), got shape {frames.shape}")
    window = _draw_window(frames.shape[1], frames.shape[2], (crop_h, crop_w), rng, flip)
    return np.ascontiguousarray(_apply_window(frames, window))


def _binary_views(frames: pa.FixedSizeListArray) -> tuple[np.ndarray, np.ndarray]:
    """Zero-copy (data, offsets) of a frames column chunk: frame j of row i is
    ``data[offsets[i*7 + j] : offsets[i*7 + j + 1]]``."""
    values = frames.flatten()  # honours the chunk's slice offset, unlike .values
    if not pa.types.is_binary(values.type):
        values = values.cast(pa.binary())
    _, offsets_buf, data_buf = values.buffers()
    offsets = np.frombuffer(offsets_buf, np.int32, count=len(values) + 1, offset=values.offset * 4)
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.empty(0, np.uint8)
    return data, offsets


def _decode_clip(
    data: np.ndarray,
    offsets: np.ndarray,
    row: int,
    *,
    clip_id: str,
    height: int,
    width: int,
    num_frames: int,
    window: _Window,
) -> np.ndarray:
    out = np.empty((num_frames, window.height, window.width, 3), np.uint8)
    first = row * FRAMES_PER_CLIP
    for t in range(num_frames):
        png = data[offsets[first + t] : offsets[first + t + 1]]
        try:
            image = decode_png_rgb(png)
        except ValueError as exc:
            raise ValueError(f"clip {clip_id}, frame im{t + 1}.png: {exc}") from exc
        if image.shape[:2] != (height, width):
            raise ValueError(
                f"clip {clip_id}, frame im{t + 1}.png: decoded {image.shape[1]}x{image.shape[0]}"
                f" but the shard records {width}x{height} (WxH)"
            )
        out[t] = _apply_window(image, window)
    return out


def _check_num_frames(num_frames: int) -> None:
    if not 1 <= num_frames <= FRAMES_PER_CLIP:
        raise ValueError(f"num_frames must be in 1..{FRAMES_PER_CLIP}, got {num_frames}")


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
    data, offsets = _binary_views(frames_col)
    clips = []
    for i, clip_id in enumerate(clip_ids):
        h, w = int(heights[i]), int(widths[i])
        try:
            window = _draw_window(h, w, crop, clip_rng(seed, clip_id, epoch), random_flip)
        except ValueError as exc:
            raise ValueError(f"clip {clip_id}: {exc}") from exc
        clips.append(
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
    if clips and all(c.shape == clips[0].shape for c in clips):
        stacked = np.stack(clips)
    else:
        # frames of different sizes and no crop: Ray keeps them as a variable-shape column
        stacked = np.empty(len(clips), dtype=object)
        stacked[:] = clips
    if not with_clip_id:
        return {"frames": stacked}
    return {"clip_id": np.array(clip_ids, dtype=object), "frames": stacked}


def _is_uri(path: str) -> bool:
    return "://" in path


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
    numpy columns. Training code turns a batch into model input with :func:`frames_to_tensor`.

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
    _check_num_frames(num_frames)
    _check_crop(crop)
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
        if not _is_uri(paths):
            _refuse_shard_root(paths)
    else:
        paths = [_absolute(os.fspath(p)) for p in shard_dir]
    return ray.data.read_parquet(paths, filesystem=filesystem).select_columns(_READ_COLUMNS)


def _absolute(path: str) -> str:
    # Ray tasks may run with another working directory (ray job submit --working-dir)
    return path if _is_uri(path) else os.path.abspath(path)


def _refuse_shard_root(path: str) -> None:
    if os.path.isdir(path) and any(os.path.isdir(os.path.join(path, s)) for s in SPLIT_LISTS):
        raise ValueError(
            f"{path} holds the split folders {sorted(SPLIT_LISTS)}: pass one of them, "
            f"e.g. {os.path.join(path, 'train')}"
        )


def frames_to_tensor(
    frames: np.ndarray | torch.Tensor,
    device: torch.device | str | None = None,
    *,
    non_blocking: bool = False,
) -> torch.Tensor:
    """uint8 [..., H, W, 3] (e.g. a Ray batch [B, T, H, W, 3]) -> float32 [..., 3, H, W] in [0, 1].

    With ``device``, the uint8 data is moved first (a quarter of the float bytes) and
    converted there. The result is contiguous.
    """
    if isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames, got {frames.dtype}")
        with warnings.catch_warnings():
            # Ray hands out read-only arrays; the uint8 view is only read, never written
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor = torch.from_numpy(frames)
    else:
        tensor = frames
        if tensor.dtype != torch.uint8:
            raise ValueError(f"expected uint8 frames, got {tensor.dtype}")
    if tensor.ndim < 3 or tensor.shape[-1] != 3:
        raise ValueError(f"expected [..., H, W, 3] frames, got shape {tuple(tensor.shape)}")
    if device is not None:
        tensor = tensor.to(device, non_blocking=non_blocking)
    out = torch.empty(
        (*tensor.shape[:-3], 3, *tensor.shape[-3:-1]), dtype=torch.float32, device=tensor.device
    )
    out.copy_(tensor.movedim(-1, -3))
    return out.div_(255.0)


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
        _check_num_frames(num_frames)
        _check_crop(crop)
        self.crop = tuple(crop) if crop is not None else None
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = epoch
        self.num_frames = num_frames
        source = os.fspath(shard_dir)
        if _is_uri(source):
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
                missing = set(_READ_COLUMNS) - set(pfile.schema_arrow.names)
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
            table = pfile.read_row_group(rg, columns=_READ_COLUMNS)
            data, offsets = _binary_views(table.column("frames").combine_chunks())
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
            window = _draw_window(h, w, self.crop, rng, self.random_flip)
        except ValueError as exc:
            raise ValueError(f"clip {clip_id}: {exc}") from exc
        frames = _decode_clip(
            data,
            offsets,
            row,
            clip_id=clip_id,
            height=h,
            width=w,
            num_frames=self.num_frames,
            window=window,
        )
        return {"clip_id": clip_id, "frames": frames_to_tensor(frames)}
