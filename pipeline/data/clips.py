"""One clip's pixels: PNG decoding, the seeded crop window and flip shared by every frame of a
clip (:func:`clip_rng`, so any reader and any worker count give the same crops), and batches
to tensors. Pure NumPy/OpenCV: the Ray and torch readers build on it.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pyarrow as pa
import torch

from pipeline.data.vimeo_layout import FRAMES_PER_CLIP

if TYPE_CHECKING:
    pass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

__all__ = [
    "READ_COLUMNS",
    "Window",
    "aligned_random_crop",
    "apply_window",
    "batch_to_tensor",
    "binary_views",
    "check_crop",
    "check_num_frames",
    "clip_rng",
    "decode_clip",
    "decode_png_rgb",
    "draw_window",
    "is_uri",
]


READ_COLUMNS = ["clip_id", "height", "width", "frames"]


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


def check_crop(crop: tuple[int, int] | None) -> None:
    if crop is not None and (len(crop) != 2 or min(crop) < 1):
        raise ValueError(f"crop must be (height, width) of positive sizes, got {crop!r}")


@dataclass(frozen=True)
class Window:
    top: int
    left: int
    height: int
    width: int
    flip: bool


def draw_window(
    height: int,
    width: int,
    crop: tuple[int, int] | None,
    rng: np.random.Generator | None,
    flip: bool,
) -> Window:
    """The crop window (and flip) for frames of ``height`` x ``width``; draws y, x, then flip."""
    check_crop(crop)
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
        return Window((height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w, False)
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    do_flip = bool(flip and rng.random() < 0.5)
    return Window(top, left, crop_h, crop_w, do_flip)


def apply_window(image: np.ndarray, w: Window) -> np.ndarray:
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
    window = draw_window(frames.shape[1], frames.shape[2], (crop_h, crop_w), rng, flip)
    return np.ascontiguousarray(apply_window(frames, window))


def binary_views(frames: pa.FixedSizeListArray) -> tuple[np.ndarray, np.ndarray]:
    """Zero-copy (data, offsets) of a frames column chunk: frame j of row i is
    ``data[offsets[i*7 + j] : offsets[i*7 + j + 1]]``."""
    values = frames.flatten()  # honours the chunk's slice offset, unlike .values
    if not pa.types.is_binary(values.type):
        values = values.cast(pa.binary())
    _, offsets_buf, data_buf = values.buffers()
    offsets = np.frombuffer(offsets_buf, np.int32, count=len(values) + 1, offset=values.offset * 4)
    data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.empty(0, np.uint8)
    return data, offsets


def decode_clip(
    data: np.ndarray,
    offsets: np.ndarray,
    row: int,
    *,
    clip_id: str,
    height: int,
    width: int,
    num_frames: int,
    window: Window,
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
        out[t] = apply_window(image, window)
    return out


def check_num_frames(num_frames: int) -> None:
    if not 1 <= num_frames <= FRAMES_PER_CLIP:
        raise ValueError(f"num_frames must be in 1..{FRAMES_PER_CLIP}, got {num_frames}")


def is_uri(path: str) -> bool:
    """Whether ``path`` names object storage (``s3://...``) rather than a local path."""
    return "://" in path


def batch_to_tensor(
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
