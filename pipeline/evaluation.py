"""Evaluation of trained PLVC models on real bitstreams (paper, "Experiments"; DESIGN §5).

The ``evaluate@<quality>``, ``evaluate_baselines`` and ``evaluate_report`` stages are thin
wrappers around this module:

* :class:`TestSet`: the held-out Vimeo-90k clips of the test shards (each clip one
  sequence; ``max_clips`` of them, evenly spread over the sorted clip list) and the raw
  YUV 4:2:0 sequences of ``evaluate.sequences`` (read with :mod:`plvc.video_io`, BT.601
  limited range, the library's convention). Every frame is centre-cropped to a multiple
  of :data:`CROP_MULTIPLE` (64, HiFiC's stride and a multiple of PLVC's 16) once, at load
  time, so every method (PLVC phases, HiFiC all-intra, x264/x265) sees the same pixels.
  GOP: ``evaluate.gop`` capped at the sequence length (-1: one I-frame per sequence).
* :func:`load_quality_models`: ``models/<q>/{single_p,multi_p,gan}/generator.pt``
  (:mod:`plvc.weights`) and ``models/<q>/hific/hific.pt``. Each generator is coded with
  the intra codec its weights file names (the one its I-frames were made with; the
  quality's ``hific.pt`` when the SHA-256 matches). Phases whose weights are absent are
  skipped and listed.
* :func:`evaluate_quality`: every sequence is coded with
  :class:`plvc.codec.VideoEncoder` and the bytes decoded again with
  :class:`plvc.codec.VideoDecoder`; the decoded frames are measured
  (:class:`pipeline.metrics.MetricSet`). Methods: ``plvc_<phase>`` for each phase present
  and ``hific_intra`` (the I-frame codec alone, every frame intra). Rate:
  ``bpp = all stream bytes x 8 / (frames x H x W)``, I-frames and container headers
  included. Every decoded frame is also compared with the encoder's reconstruction
  (``decoder_mismatch_frames`` must be 0: encoder and decoder agree bit for bit).
* :func:`evaluate_anchors`: x264 / x265 (:mod:`pipeline.baselines`, low-delay P with the
  same GOP) on the same frames, at every rate point of ``evaluate.baselines``.
* :func:`write_evaluation` / :func:`build_report`: the files below.

I-frame sharing: all methods of one quality code the same I-frames with the same
deterministic intra codec, so :class:`CachedIntraCodec` codes each distinct I-frame once
per sequence and hands the same bytes and decoded pixels to the other methods (what a
fresh decode of those bytes gives: the intra codecs decode bit-exactly). P-frames are
always coded and decoded for real.

Long sequences are measured in chunks of at most ``chunk_pixels`` pixels (32 frames of
1080p) to bound memory; the temporal measures (``tdiff_mae``, ``tlp``) are then undefined
at the first frame of each chunk, as at frame 0. Vimeo clips are one chunk.

Outputs of one evaluation (``reports/<q>/`` or ``reports/baselines/``):

``metrics.json`` (DVC metrics)
    ``point`` (the quality, or ``"baselines"``), ``gop``, ``metrics`` (selected),
    ``random_backbones`` (backbones that were random: numbers NOT comparable),
    ``test_set`` (``sequences``, ``frames``, ``vimeo_clips``, ``yuv_sequences``,
    ``crop_multiple``, ``fingerprint``: equal fingerprints = the same frames, crops and
    GOPs), ``missing_phases``, and ``methods.<method>`` (for anchors
    ``methods.<codec>.<rate point>``): the metric summary of
    :class:`pipeline.metrics.MetricRun` (frame-averaged per-frame metrics, ``fid``,
    ``kid``, ``bpp``, ``num_frames``, ``num_videos``, ...), ``bytes`` (all stream bytes),
    ``payload_bytes`` (entropy-coded frame payloads; the rest is container framing),
    timings in ms per frame (``encode_ms_per_pframe``/``decode_ms_per_pframe`` for PLVC,
    ``encode_ms_per_frame``/``decode_ms_per_frame`` for the intra codec and the anchors;
    PLVC's I-frames are the intra codec's; wall clock of this run, for orientation) and
    ``decoder_mismatch_frames`` (decoded frames that differ from the encoder's own
    reconstruction: 0, or the codec has an encoder/decoder drift bug).
``frames.csv`` (DVC plots)
    One row per decoded frame: ``method``, ``point``, ``video``, ``frame``,
    ``frame_type`` (I/P), ``bytes`` and ``bpp`` (that frame's payload; empty for anchors,
    whose per-frame sizes are not parsed), then every per-frame metric.
``points.json``, ``points.csv``, ``by_method/<method>.csv``
    RD points (:func:`pipeline.rd.write_points`): ``method``, ``point``, ``bpp`` and the
    summary metrics.
``gop_profile/<method>.csv`` (DVC plots)
    Means over sequences per position in the GOP (``position`` 0 is the I-frame):
    ``count``, ``bpp`` and every per-frame metric, where drift along the P-frames shows.
``sources.json``
    ``sequences``: every sequence's ``name``, ``source`` (vimeo/yuv), ``frames``,
    ``height``, ``width`` (after the crop), ``source_height``, ``source_width``,
    ``crop_top``, ``crop_left``, ``gop``, ``fps``; ``methods``: where each method comes
    from (``weights`` files; the anchors' ``preset``, ``tune``, ``rate_control``).
``images/frames_<k>.png``, ``images/profile_<k>.png``
    For the first sequences: decoded frames of every method next to the original and
    x265 at PLVC's rate, and temporal profiles (the middle row of each frame stacked over
    time, the paper's Figs. 1 and 6).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.metrics import (
    FRAME_METRICS,
    RANDOM_SUFFIX,
    SET_METRICS,
    EvaluationError,
    MetricConfig,
    MetricRun,
    MetricSet,
    json_safe,
)
from pipeline.rd import (
    PLOT_METRICS,
    BDRateError,
    RDPoint,
    bd_rate_table,
    curves,
    plot_rd_all,
    read_points_json,
    write_frame_rows_csv,
    write_points,
)
from plvc.weights import file_sha256

if TYPE_CHECKING:
    from pipeline.baselines import BaselineConfig
    from pipeline.config import BaselineSpec, EvaluateConfig, YUVSequence
    from plvc.generator import PLVC
    from plvc.intra import IntraCodec
    from plvc.weights import WeightsMeta

__all__ = [
    "BD_METRICS",
    "CROP_MULTIPLE",
    "INTRA_METHOD",
    "PHASES",
    "REFERENCE_METHOD",
    "CachedIntraCodec",
    "EvaluationResult",
    "PhaseModel",
    "QualityModels",
    "ReportResult",
    "TestSequence",
    "TestSet",
    "anchor_configs",
    "build_report",
    "center_crop_box",
    "check_anchors",
    "evaluate_anchors",
    "evaluate_quality",
    "gop_profile",
    "load_quality_models",
    "metric_config",
    "mlflow_metrics",
    "phase_method",
    "temporal_profile",
    "write_evaluation",
]

#: frames are centre-cropped to a multiple of this (HiFiC's stride 2^4 x 4; PLVC needs 16)
CROP_MULTIPLE = 64
#: PLVC's training phases, in order; each exported model is one method
PHASES = ("single_p", "multi_p", "gan")
#: the I-frame codec alone, every frame intra
INTRA_METHOD = "hific_intra"
#: the anchor BD-rates are computed against
REFERENCE_METHOD = "x265"
#: the BD-rate table's metrics (perception and fidelity)
BD_METRICS = ("lpips", "psnr_rgb")
#: pixels measured per chunk of a long sequence (32 frames of 1920x1024)
CHUNK_PIXELS = 32 * 1920 * 1024
#: frames of a sequence shown in the images (frame grid and temporal profile)
VISUAL_SPAN = 32
_VIEW = (256, 448)  # (height, width) of the centre window shown of each frame
_LABEL_WIDTH = 176


def phase_method(phase: str) -> str:
    """Method name of a PLVC phase's model: ``plvc_single_p``, ``plvc_multi_p``, ``plvc_gan``."""
    return f"plvc_{phase}"


def metric_config(cfg: EvaluateConfig, device: str | torch.device) -> MetricConfig:
    """The :class:`MetricConfig` of the ``evaluate`` params."""
    return MetricConfig(
        metrics=tuple(cfg.metrics),
        lpips_backbone=cfg.lpips_backbone,
        inception_weights=cfg.inception_weights,
        allow_random_backbone=cfg.allow_random_backbone,
        device=str(device),
    )


# ---------------------------------------------------------------------------------------
# test sequences


def center_crop_box(
    height: int, width: int, multiple: int = CROP_MULTIPLE, *, name: str = "frames"
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of the centred crop to the largest multiple of ``multiple``."""
    h, w = height - height % multiple, width - width % multiple
    if h == 0 or w == 0:
        raise EvaluationError(
            f"{name}: {width}x{height} frames are smaller than the codec's {multiple}-pixel "
            "block; evaluation needs at least 64x64"
        )
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass
class TestSequence:
    """One test sequence, cropped: ``frames`` is RGB ``uint8 [T, H, W, 3]``."""

    __test__ = False  # not a pytest test class

    name: str
    source: str
    frames: np.ndarray
    fps: float
    source_size: tuple[int, int]
    crop_box: tuple[int, int, int, int]

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])

    def gop(self, gop: int) -> int:
        """The GOP this sequence is coded with: ``gop`` capped at its length (-1: its length)."""
        return self.num_frames if gop == -1 else min(gop, self.num_frames)

    def describe(self, gop: int) -> dict[str, Any]:
        top, left, _, _ = self.crop_box
        return {
            "name": self.name,
            "source": self.source,
            "frames": self.num_frames,
            "height": self.height,
            "width": self.width,
            "source_height": self.source_size[0],
            "source_width": self.source_size[1],
            "crop_top": top,
            "crop_left": left,
            "gop": self.gop(gop),
            "fps": self.fps,
        }


def _crop(frames: np.ndarray, name: str, multiple: int) -> tuple[np.ndarray, tuple[int, ...]]:
    top, left, h, w = center_crop_box(frames.shape[1], frames.shape[2], multiple, name=name)
    return np.ascontiguousarray(frames[:, top : top + h, left : left + w]), (top, left, h, w)


class TestSet:
    """The evaluation's sequences, loaded one at a time (a UVG sequence is ~3.7 GB of RGB).

    ``yuv_sequences`` come first (``evaluate.sequences``, objects with ``name``, ``path``,
    ``width``, ``height``, ``frames``, ``fps``), then the Vimeo clips of ``shard_dir`` (a
    split folder such as ``data/shards/test``; None: no Vimeo clips). Files and shards are
    checked here, before any coding.
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        shard_dir: str | os.PathLike[str] | None,
        *,
        max_clips: int | None = None,
        yuv_sequences: Sequence[YUVSequence] = (),
        multiple: int = CROP_MULTIPLE,
    ) -> None:
        self.multiple = multiple
        self.yuv = list(yuv_sequences)
        self._shards: Any = None
        self._clip_indices: list[int] = []
        seen: set[str] = set()
        for i, seq in enumerate(self.yuv):
            where = f"evaluate.sequences[{i}] ({seq.name})"
            if seq.name in seen:
                raise EvaluationError(f"{where}: the name {seq.name!r} is used twice")
            seen.add(seq.name)
            if not Path(seq.path).is_file():
                raise EvaluationError(f"{where}: {seq.path} does not exist")
            center_crop_box(seq.height, seq.width, multiple, name=where)
        if shard_dir is not None:
            from pipeline.datasets import SeptupletShards

            try:
                self._shards = SeptupletShards(shard_dir)
            except (FileNotFoundError, ValueError) as exc:
                raise EvaluationError(
                    f"test shards {shard_dir}: {exc} (run the shard stage first)"
                ) from None
            n = len(self._shards)
            k = n if max_clips is None else min(max_clips, n)
            # evenly spread over the sorted ids: clips of every source video, not the first one
            self._clip_indices = sorted({round(i) for i in np.linspace(0, n - 1, k)}) if k else []
        if not self.yuv and not self._clip_indices:
            raise EvaluationError(
                "no test sequences: the test shards hold no clips and evaluate.sequences is empty"
            )

    @property
    def names(self) -> list[str]:
        clips = [f"vimeo/{self._shards.clip_ids[i]}" for i in self._clip_indices]
        return [s.name for s in self.yuv] + clips

    def __len__(self) -> int:
        return len(self.yuv) + len(self._clip_indices)

    def total_frames(self) -> int:
        """Frames over all sequences (Vimeo clips: the shards' frames per clip)."""
        from pipeline.shards import FRAMES_PER_CLIP

        return sum(s.frames for s in self.yuv) + FRAMES_PER_CLIP * len(self._clip_indices)

    def __iter__(self) -> Iterator[TestSequence]:
        for i, spec in enumerate(self.yuv):
            yield self.load_yuv(i, spec)
        for index in self._clip_indices:
            item = self._shards[index]
            frames = (item["frames"] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            name = f"vimeo/{item['clip_id']}"
            cropped, box = _crop(frames, name, self.multiple)
            yield TestSequence(name, "vimeo", cropped, 30.0, frames.shape[1:3], box)  # type: ignore[arg-type]

    def load_yuv(self, i: int, spec: YUVSequence) -> TestSequence:
        """Read ``evaluate.sequences[i]`` (raw ``.yuv`` of the given size, or ``.y4m``)."""
        from plvc.errors import VideoIOError
        from plvc.video_io import open_video

        where = f"evaluate.sequences[{i}] ({spec.name})"
        try:
            reader = open_video(spec.path, size=(spec.width, spec.height), max_frames=spec.frames)
            if (reader.width, reader.height) != (spec.width, spec.height):
                raise EvaluationError(
                    f"{where}: {spec.path} is {reader.width}x{reader.height}, the params say "
                    f"{spec.width}x{spec.height}"
                )
            top, left, h, w = center_crop_box(spec.height, spec.width, self.multiple, name=where)
            frames = np.empty((spec.frames, h, w, 3), np.uint8)
            count = 0
            for frame in reader:
                frames[count] = frame[top : top + h, left : left + w]
                count += 1
        except VideoIOError as exc:
            raise EvaluationError(f"{where}: {exc}") from None
        if count < spec.frames:
            raise EvaluationError(
                f"{where}: {spec.path} holds {count} frames, evaluate.sequences[{i}].frames "
                f"asks for {spec.frames}"
            )
        return TestSequence(
            spec.name, "yuv", frames, float(spec.fps), (spec.height, spec.width), (top, left, h, w)
        )


# ---------------------------------------------------------------------------------------
# models


class CachedIntraCodec:
    """An intra codec that codes each distinct image once (it is deterministic).

    ``encode`` is keyed by the image's bytes, ``decode`` by the stream's; decoded images
    on the 8-bit grid (HiFiC's) are kept as ``uint8``. :meth:`clear` between sequences.
    """

    def __init__(self, inner: IntraCodec) -> None:
        self.inner = inner
        self.name = inner.name
        self.stride = inner.stride
        self._encoded: dict[bytes, bytes] = {}
        self._decoded: dict[bytes, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @property
    def config(self) -> dict[str, Any]:
        from plvc.codec import intra_spec

        return intra_spec(self.inner)[1]

    def clear(self) -> None:
        self._encoded.clear()
        self._decoded.clear()

    @staticmethod
    def _image_key(image: torch.Tensor) -> bytes:
        x = image.detach().float().contiguous().cpu()
        digest = hashlib.sha256(str(tuple(x.shape)).encode())
        digest.update(x.numpy().tobytes())
        return digest.digest()

    def encode(self, image: torch.Tensor) -> bytes:
        key = self._image_key(image)
        payload = self._encoded.get(key)
        if payload is None:
            self.misses += 1
            payload = self.inner.encode(image)
            self._encoded[key] = payload
        else:
            self.hits += 1
        return payload

    def decode(self, data: bytes) -> torch.Tensor:
        key = hashlib.sha256(data).digest()
        cached = self._decoded.get(key)
        if cached is not None:
            self.hits += 1
            return cached.float().div(255.0) if cached.dtype == torch.uint8 else cached.clone()
        self.misses += 1
        image = self.inner.decode(data)
        self._remember_decoded(key, image)
        return image

    def _remember_decoded(self, key: bytes, image: torch.Tensor) -> None:
        levels = image.detach().float().cpu().mul(255.0).round()
        on_grid = torch.equal(levels.div(255.0), image.detach().float().cpu())
        self._decoded[key] = levels.to(torch.uint8) if on_grid else image.detach().cpu().clone()

    def remember(self, image: torch.Tensor, payload: bytes, decoded: torch.Tensor) -> None:
        """Seed the cache with a coding of ``image`` done with :attr:`inner` elsewhere."""
        self._encoded.setdefault(self._image_key(image), payload)
        key = hashlib.sha256(payload).digest()
        if key not in self._decoded:
            self._remember_decoded(key, decoded)


@dataclass
class PhaseModel:
    """One PLVC phase's exported generator and the intra codec it pairs with."""

    phase: str
    path: Path
    model: PLVC
    meta: WeightsMeta
    intra: CachedIntraCodec

    @property
    def method(self) -> str:
        return phase_method(self.phase)


@dataclass
class QualityModels:
    """Everything :func:`evaluate_quality` codes with for one quality."""

    quality: str
    phases: list[PhaseModel]
    #: the all-intra method's codec (the quality's ``hific.pt``, else the generators')
    intra: CachedIntraCodec
    intra_source: str
    missing_phases: list[str] = field(default_factory=list)

    def codecs(self) -> list[CachedIntraCodec]:
        out: list[CachedIntraCodec] = [self.intra]
        for p in self.phases:
            if all(p.intra is not c for c in out):
                out.append(p.intra)
        return out


def load_quality_models(
    models_dir: str | os.PathLike[str], quality: str, device: str | torch.device = "cpu"
) -> QualityModels:
    """Load ``models_dir/<quality>/{single_p,multi_p,gan}/generator.pt`` (those present) and
    the intra codecs. Raises :class:`EvaluationError` naming the files when none is present,
    or a :class:`plvc.errors.PLVCError` naming the file that cannot be loaded."""
    from plvc.hific import hific_intra_codec
    from plvc.intra import get_intra_codec
    from plvc.weights import load_weights

    root = Path(models_dir) / quality
    hific_path = root / "hific" / "hific.pt"
    shared: CachedIntraCodec | None = None
    shared_sha = None
    if hific_path.is_file():
        shared = CachedIntraCodec(hific_intra_codec(weights=hific_path, device=device))
        shared_sha = shared.config.get("weights_sha256") or file_sha256(hific_path)
    by_spec: dict[str, CachedIntraCodec] = {}
    phases: list[PhaseModel] = []
    missing: list[str] = []
    for phase in PHASES:
        path = root / phase / "generator.pt"
        if not path.is_file():
            missing.append(phase)
            continue
        model, meta = load_weights(path, map_location=device)
        same_file = (
            shared is not None
            and meta.intra_name == "hific"
            and meta.intra_config.get("weights_sha256") == shared_sha
        )
        if same_file:
            assert shared is not None
            intra = shared
        else:
            spec = repr((meta.intra_name, sorted(meta.intra_config.items())))
            if spec not in by_spec:
                config = dict(meta.intra_config)
                if meta.intra_name == "hific":
                    config["device"] = device
                try:
                    by_spec[spec] = CachedIntraCodec(get_intra_codec(meta.intra_name, **config))
                except TypeError as exc:
                    raise EvaluationError(
                        f"{path}: its intra codec {meta.intra_name!r} {meta.intra_config} "
                        f"cannot be rebuilt: {exc}"
                    ) from None
                if shared is not None:
                    warnings.warn(
                        f"{path} pairs with intra codec {meta.intra_name} "
                        f"{meta.intra_config}, not {hific_path}: coding its I-frames with "
                        "its own",
                        stacklevel=2,
                    )
            intra = by_spec[spec]
        phases.append(PhaseModel(phase, path, model, meta, intra))
    if not phases and shared is None:
        wanted = ", ".join(str(root / p / "generator.pt") for p in PHASES)
        raise EvaluationError(
            f"no trained models for quality {quality!r}: none of {wanted} or {hific_path} "
            f"exists; run the training stages (train_single_p@{quality} ...) first"
        )
    if shared is not None:
        intra, source = shared, str(hific_path)
    else:
        intra, source = phases[0].intra, f"intra codec of {phases[0].path}"
    return QualityModels(quality, phases, intra, source, missing)


# ---------------------------------------------------------------------------------------
# measuring


def _to_uint8(frame: torch.Tensor) -> np.ndarray:
    """Float ``[3, H, W]`` in [0, 1] -> ``uint8 [H, W, 3]`` (what a decoder writes to a file)."""
    x = frame.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(1, 2, 0).cpu().numpy()


def _u8_tensor(frames: np.ndarray) -> torch.Tensor:
    """``uint8 [T, H, W, 3]`` -> float ``[T, 3, H, W]`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)


def _is_metric_key(key: str) -> bool:
    return key.removesuffix(RANDOM_SUFFIX) in (*FRAME_METRICS, *SET_METRICS, "kid_std")


class _Method:
    """One method (at one rate point) accumulated over the test set: one :class:`MetricRun`."""

    def __init__(
        self, name: str, point: str, metric_set: MetricSet, chunk_pixels: int, **source: Any
    ) -> None:
        self.name, self.point = name, point
        self.run: MetricRun = metric_set.start()
        self.chunk_pixels = chunk_pixels
        #: where the method comes from (weights file, encoder settings): ``sources.json``
        self.source = source
        self.rows: list[dict[str, Any]] = []
        self.bytes = 0
        self.payload_bytes = 0
        self.videos = 0
        self.mismatches = 0
        self.times: dict[str, list[float]] = {}
        self.sequence_bpp: dict[str, float] = {}

    def time(self, key: str, seconds: float) -> None:
        self.times.setdefault(key, []).append(seconds)

    def measure(
        self,
        seq: TestSequence,
        decoded: np.ndarray,
        num_bytes: int,
        frame_info: Sequence[Mapping[str, Any]],
    ) -> None:
        """Measure a decoded sequence (``uint8 [T, H, W, 3]``) against the original."""
        t, h, w = seq.num_frames, seq.height, seq.width
        if decoded.shape != seq.frames.shape:
            raise EvaluationError(
                f"{self.name} {self.point} {seq.name}: decoded {list(decoded.shape)}, "
                f"the original is {list(seq.frames.shape)}"
            )
        chunk = max(2, self.chunk_pixels // (h * w))
        for start in range(0, t, chunk):
            end = min(t, start + chunk)
            rows = self.run.add_video(
                seq.name,
                _u8_tensor(seq.frames[start:end]),
                _u8_tensor(decoded[start:end]),
                num_bytes=num_bytes if start == 0 else 0,
            )
            for row in rows:
                row["frame"] += start  # the run keeps these dicts: its rows are re-indexed too
                i = row["frame"]
                head = {"method": self.name, "point": self.point, "video": seq.name, "frame": i}
                self.rows.append({**head, **frame_info[i], **row})
        self.bytes += num_bytes
        self.videos += 1
        self.sequence_bpp[seq.name] = num_bytes * 8 / (t * h * w)

    def summary(self) -> dict[str, Any]:
        result = self.run.finish()
        summary = {k: v for k, v in result.summary.items() if k != "random_backbones"}
        summary["num_videos"] = self.videos  # the run counted chunks
        summary["bytes"] = self.bytes
        if self.payload_bytes:
            summary["payload_bytes"] = self.payload_bytes
        for key, values in sorted(self.times.items()):
            summary[key] = 1000.0 * sum(values) / len(values)
        summary["decoder_mismatch_frames"] = self.mismatches
        return summary

    def rd_point(self, summary: Mapping[str, Any]) -> RDPoint:
        kept = {k: v for k, v in summary.items() if _is_metric_key(k) or k in ("bpp", "num_frames")}
        return RDPoint.from_summary(self.name, self.point, kept)


def _frame_info(
    types: Sequence[str], payloads: Sequence[int | None], pixels: int
) -> list[dict[str, Any]]:
    return [
        {
            "frame_type": ft,
            "bytes": "" if b is None else b,
            "bpp": "" if b is None else b * 8 / pixels,
        }
        for ft, b in zip(types, payloads, strict=True)
    ]


def _digest(frame: np.ndarray) -> bytes:
    return hashlib.sha256(frame.tobytes()).digest()


def _code_plvc(
    seq: TestSequence, phase: PhaseModel, method: _Method, gop: int, quality: str, bar: Any
) -> np.ndarray:
    """Encode one sequence with one PLVC model, decode the bytes, check, measure."""
    from plvc.codec import VideoDecoder, VideoEncoder

    encoder = VideoEncoder(
        phase.model,
        phase.intra,  # type: ignore[arg-type]
        width=seq.width,
        height=seq.height,
        gop=seq.gop(gop),
        quality=quality,
        fps=Fraction(seq.fps).limit_denominator(1001),
    )
    digests, types, payloads = [], [], []
    for frame in seq.frames:
        start = time.perf_counter()
        stats, x_hat = encoder.encode_frame(frame)
        if stats.frame_type == "P":  # the I-frames are the intra codec's (measured alone)
            method.time("encode_ms_per_pframe", time.perf_counter() - start)
        digests.append(_digest(_to_uint8(x_hat)))
        types.append(stats.frame_type)
        payloads.append(stats.payload_bytes)
        bar.update(0.5)
    data = encoder.finish()
    decoder = VideoDecoder(data, phase.model, intra=phase.intra)  # type: ignore[arg-type]
    if len(decoder) != seq.num_frames:
        raise EvaluationError(
            f"{method.name} {seq.name}: the stream holds {len(decoder)} frames, "
            f"not {seq.num_frames}"
        )
    decoded = np.empty_like(seq.frames)
    frames = iter(decoder)
    for i in range(seq.num_frames):
        start = time.perf_counter()
        frame = next(frames)
        if types[i] == "P":
            method.time("decode_ms_per_pframe", time.perf_counter() - start)
        decoded[i] = _to_uint8(frame)
        method.mismatches += _digest(decoded[i]) != digests[i]
        bar.update(0.5)
    method.payload_bytes += sum(payloads)
    method.measure(seq, decoded, len(data), _frame_info(types, payloads, seq.height * seq.width))
    return decoded


def _code_intra(
    seq: TestSequence, intra: CachedIntraCodec, method: _Method, gop: int, bar: Any
) -> np.ndarray:
    """Every frame through the intra codec alone; its codings of the GOPs' first frames
    seed the cache the PLVC methods' I-frames come from."""
    decoded = np.empty_like(seq.frames)
    payloads = []
    period = seq.gop(gop)
    for i, frame in enumerate(seq.frames):
        x = _u8_tensor(frame[None])[0]
        start = time.perf_counter()
        payload = intra.inner.encode(x)
        method.time("encode_ms_per_frame", time.perf_counter() - start)
        start = time.perf_counter()
        image = intra.inner.decode(payload)
        method.time("decode_ms_per_frame", time.perf_counter() - start)
        decoded[i] = _to_uint8(image)
        payloads.append(len(payload))
        if i % period == 0:
            intra.remember(x, payload, image)
        bar.update(1)
    method.payload_bytes += sum(payloads)
    info = _frame_info(["I"] * len(payloads), payloads, seq.height * seq.width)
    method.measure(seq, decoded, sum(payloads), info)
    return decoded


# ---------------------------------------------------------------------------------------
# images


def _label_strip(lines: Sequence[str], height: int, width: int = _LABEL_WIDTH) -> np.ndarray:
    import cv2

    strip = np.full((height, width, 3), 255, np.uint8)
    for k, text in enumerate(lines):
        y = 16 + 16 * k
        if y > height - 2:
            break
        cv2.putText(strip, text, (4, y), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def temporal_profile(frames: np.ndarray, row: int | None = None, scale: int = 1) -> np.ndarray:
    """Pixel row ``row`` (default: the middle) of every frame of ``uint8 [T, H, W, 3]``,
    stacked over time, each frame ``scale`` pixels tall (paper Figs. 1, 6): ``[T*scale, W, 3]``."""
    y = frames.shape[1] // 2 if row is None else row
    return np.repeat(frames[:, y], scale, axis=0)


class _Visuals:
    """Decoded frames and temporal profiles of one sequence, every method on one image."""

    def __init__(self, seq: TestSequence, gop: int) -> None:
        self.seq = seq
        self.span = min(seq.num_frames, VISUAL_SPAN)
        self.period = period = seq.gop(gop)
        self.columns = sorted({0, min(period, self.span) - 1, self.span - 1})
        vh, vw = min(_VIEW[0], seq.height), min(_VIEW[1], seq.width)
        self.top, self.left = (seq.height - vh) // 2, (seq.width - vw) // 2
        self.view = (vh, vw)
        self.entries: list[tuple[list[str], np.ndarray]] = []
        self.add(["original", seq.name[:26]], seq.frames)

    def add(self, label: Sequence[str], decoded: np.ndarray, position: int | None = None) -> None:
        """Keep the shown window of ``decoded`` (``uint8 [T, H, W, 3]``), labelled."""
        vh, vw = self.view
        window = decoded[: self.span, self.top : self.top + vh, self.left : self.left + vw]
        entry = (list(label), np.ascontiguousarray(window))
        self.entries.insert(len(self.entries) if position is None else position, entry)

    def render(self) -> dict[str, np.ndarray]:
        vh, vw = self.view
        gap = 4
        rows = []
        header = [_label_strip([f"{self.seq.width}x{self.seq.height}"], 20)]
        for c in self.columns:
            kind = "I" if c % self.period == 0 else "P"
            header += [
                np.full((20, gap, 3), 255, np.uint8),
                _label_strip([f"frame {c} ({kind})"], 20, vw),
            ]
        rows.append(np.concatenate(header, axis=1))
        for label, window in self.entries:
            cells = [_label_strip(label, vh)]
            for c in self.columns:
                cells += [np.full((vh, gap, 3), 255, np.uint8), window[c]]
            rows += [
                np.full((gap, rows[0].shape[1], 3), 255, np.uint8),
                np.concatenate(cells, axis=1),
            ]
        scale = max(1, 96 // self.span)
        blocks = []
        for label, window in self.entries:
            profile = temporal_profile(window, scale=scale)
            strip = _label_strip(label, max(profile.shape[0], 36))
            if profile.shape[0] < strip.shape[0]:
                pad = np.full((strip.shape[0] - profile.shape[0], vw, 3), 255, np.uint8)
                profile = np.concatenate([profile, pad])
            blocks += [
                np.concatenate([strip, profile], axis=1),
                np.full((gap, _LABEL_WIDTH + vw, 3), 255, np.uint8),
            ]
        return {"frames": np.concatenate(rows), "profile": np.concatenate(blocks[:-1])}


def _matched_anchor(
    seq: TestSequence, target_bpp: float, gop: int, ffmpeg: str | None, span: int
) -> tuple[np.ndarray, float] | None:
    """x265 on the first ``span`` frames at ``target_bpp`` (two-pass), for the images."""
    from pipeline.baselines import BaselineConfig, BaselineError, encode_decode

    cfg = BaselineConfig(
        codec="x265",
        rate_control="bpp",
        points=(target_bpp,),
        gop_size=min(seq.gop(gop), span),
        fps=seq.fps,
        ffmpeg=ffmpeg,
    )
    try:
        result = encode_decode(_u8_tensor(seq.frames[:span]), cfg, target_bpp)
    except BaselineError as exc:
        warnings.warn(f"{seq.name}: no x265 image at {target_bpp:.4f} bpp: {exc}", stacklevel=2)
        return None
    frames = (result.decoded * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return frames, result.bpp


# ---------------------------------------------------------------------------------------
# evaluations


@dataclass
class EvaluationResult:
    """What one evaluation (a quality, or the anchors) measured."""

    #: the quality name, or ``"baselines"``
    point: str
    gop: int
    metrics: list[str]
    random_backbones: list[str]
    #: method -> summary; anchors: codec -> rate point -> summary
    methods: dict[str, Any]
    rows: list[dict[str, Any]]
    points: list[RDPoint]
    sequences: list[dict[str, Any]]
    #: method -> where it comes from (anchors: codec -> rate point -> settings)
    sources: dict[str, Any] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)
    missing_phases: list[str] = field(default_factory=list)

    def test_set_summary(self) -> dict[str, Any]:
        """Counts and a fingerprint (SHA-256 of names, sizes, crops, GOPs) of the frames."""
        key = repr([sorted(s.items()) for s in self.sequences]).encode()
        return {
            "sequences": len(self.sequences),
            "frames": sum(s["frames"] for s in self.sequences),
            "vimeo_clips": sum(s["source"] == "vimeo" for s in self.sequences),
            "yuv_sequences": sum(s["source"] == "yuv" for s in self.sequences),
            "crop_multiple": CROP_MULTIPLE,
            "fingerprint": hashlib.sha256(key).hexdigest()[:16],
        }

    def metrics_json(self) -> dict[str, Any]:
        """The ``metrics.json`` document (strict JSON: see :func:`pipeline.metrics.json_safe`)."""
        return json_safe(
            {
                "point": self.point,
                "gop": self.gop,
                "metrics": self.metrics,
                "random_backbones": self.random_backbones,
                "test_set": self.test_set_summary(),
                "missing_phases": self.missing_phases,
                "methods": self.methods,
            }
        )


def _progress(total: int, desc: str, enabled: bool) -> Any:
    return tqdm(total=total, desc=desc, unit="frame", disable=not enabled, dynamic_ncols=True)


def evaluate_quality(
    test_set: TestSet,
    models: QualityModels,
    metric_set: MetricSet,
    *,
    gop: int,
    visual_sequences: int = 2,
    ffmpeg: str | None = None,
    chunk_pixels: int = CHUNK_PIXELS,
    progress: bool = True,
) -> EvaluationResult:
    """Code every sequence with every method of ``models`` (real bitstreams, decoded back),
    measure, and draw images for the first ``visual_sequences`` sequences (with x265 at
    the last PLVC phase's rate when ffmpeg is there)."""
    quality = models.quality
    methods = {
        INTRA_METHOD: _Method(
            INTRA_METHOD, quality, metric_set, chunk_pixels, weights=models.intra_source
        )
    }
    for phase in models.phases:
        methods[phase.method] = _Method(
            phase.method, quality, metric_set, chunk_pixels, weights=str(phase.path)
        )
    sequences: list[dict[str, Any]] = []
    images: dict[str, np.ndarray] = {}
    total = test_set.total_frames() * len(methods)
    with _progress(total, f"evaluate {quality}", progress) as bar, torch.inference_mode():
        for k, seq in enumerate(test_set):
            bar.set_postfix_str(seq.name, refresh=False)
            sequences.append(seq.describe(gop))
            for codec in models.codecs():
                codec.clear()
            visuals = _Visuals(seq, gop) if k < visual_sequences else None
            to_code: list[tuple[_Method, PhaseModel | None]] = [(methods[INTRA_METHOD], None)]
            to_code += [(methods[phase.method], phase) for phase in models.phases]
            for method, phase in to_code:
                if phase is None:
                    decoded = _code_intra(seq, models.intra, method, gop, bar)
                else:
                    decoded = _code_plvc(seq, phase, method, gop, quality, bar)
                if visuals is not None:
                    visuals.add([method.name, f"{method.sequence_bpp[seq.name]:.4f} bpp"], decoded)
                del decoded
            if visuals is not None:
                last = methods[models.phases[-1].method] if models.phases else methods[INTRA_METHOD]
                target = last.sequence_bpp[seq.name]
                anchor = _matched_anchor(seq, target, gop, ffmpeg, visuals.span)
                if anchor is not None:
                    visuals.add(["x265 (matched)", f"{anchor[1]:.4f} bpp"], anchor[0], position=1)
                for kind, image in visuals.render().items():
                    images[f"{kind}_{k}"] = image
    summaries = {name: m.summary() for name, m in methods.items()}
    return EvaluationResult(
        point=quality,
        gop=gop,
        metrics=list(metric_set.config.metrics),
        random_backbones=list(metric_set.random_backbones),
        methods=summaries,
        rows=[row for m in methods.values() for row in m.rows],
        points=[m.rd_point(summaries[name]) for name, m in methods.items()],
        sequences=sequences,
        sources={name: m.source for name, m in methods.items()},
        images=images,
        missing_phases=list(models.missing_phases),
    )


def anchor_configs(
    specs: Sequence[BaselineSpec], ffmpeg: str | os.PathLike[str] | None
) -> list[BaselineConfig]:
    """:class:`pipeline.baselines.BaselineConfig` of every ``evaluate.baselines`` entry; the
    GOP and frame rate are set per sequence."""
    from pipeline.baselines import BaselineConfig

    return [
        BaselineConfig(
            codec=s.codec,
            rate_control=s.rate_control,
            points=tuple(float(p) for p in s.points),
            ffmpeg=None if ffmpeg is None else str(ffmpeg),
        )
        for s in specs
    ]


def check_anchors(configs: Sequence[BaselineConfig]) -> None:
    """Fail before any work when ffmpeg or one of its encoders is missing."""
    from pipeline.baselines import CODECS, FFmpegNotFoundError, ffmpeg_encoders, find_ffmpeg

    for cfg in configs:
        binary = find_ffmpeg(cfg.ffmpeg)
        encoder = CODECS[cfg.codec][0]
        if encoder not in ffmpeg_encoders(binary):
            raise FFmpegNotFoundError(
                f"{binary} has no {encoder} encoder: set evaluate.ffmpeg to an ffmpeg built "
                "with libx264 and libx265"
            )


def evaluate_anchors(
    test_set: TestSet,
    configs: Sequence[BaselineConfig],
    metric_set: MetricSet,
    *,
    gop: int,
    workers: int | None = None,
    chunk_pixels: int = CHUNK_PIXELS,
    memory_budget: int | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Every rate point of every anchor on every sequence (same frames, same GOP),
    decoded and measured like the learned codec. ``workers`` ffmpeg encodes run at once
    (default: one per core, fewer when their frames would exceed ``memory_budget`` bytes,
    default half the available memory: a 600-frame 1080p encode holds ~26 GB)."""
    from pipeline.baselines import encode_decode

    check_anchors(configs)
    if memory_budget is None:
        try:
            import psutil  # a Ray dependency, not one of ours

            memory_budget = psutil.virtual_memory().available // 2
        except ImportError:
            memory_budget = 16 << 30
    jobs = [(cfg, value) for cfg in configs for value in cfg.points]
    methods: dict[tuple[str, str], _Method] = {}
    for cfg, value in jobs:
        label = f"{cfg.rate_control}={value:g}"
        methods[(cfg.codec, label)] = _Method(
            cfg.codec, label, metric_set, chunk_pixels, preset=cfg.preset, tune=cfg.tune or None
        )
    sequences: list[dict[str, Any]] = []
    total = test_set.total_frames() * len(jobs)
    with _progress(total, "evaluate anchors", progress) as bar, torch.inference_mode():
        for seq in test_set:
            bar.set_postfix_str(seq.name, refresh=False)
            sequences.append(seq.describe(gop))
            period = seq.gop(gop)
            frames = _u8_tensor(seq.frames)
            # an encode holds RGB and YUV copies of the input and the decoded frames as floats
            per_job = seq.frames.nbytes * 8
            limit = workers or os.cpu_count() or 1
            pool_size = max(1, min(len(jobs), limit, memory_budget // max(per_job, 1)))
            types = ["I" if i % period == 0 else "P" for i in range(seq.num_frames)]
            info = _frame_info(types, [None] * seq.num_frames, seq.height * seq.width)

            def submit(pool: ThreadPoolExecutor, job: tuple[BaselineConfig, float]) -> Future[Any]:
                cfg, value = job
                per_sequence = dataclasses.replace(cfg, gop_size=period, fps=seq.fps)  # noqa: B023
                return pool.submit(encode_decode, frames, per_sequence, value)  # noqa: B023

            # at most pool_size results in memory; measured in job order (deterministic rows)
            with ThreadPoolExecutor(max_workers=pool_size) as pool:
                queue = iter(jobs)
                pending: deque[tuple[tuple[BaselineConfig, float], Future[Any]]] = deque(
                    (job, submit(pool, job)) for job in itertools.islice(queue, pool_size)
                )
                while pending:
                    (cfg, value), future = pending.popleft()
                    result = future.result()
                    nxt = next(queue, None)
                    if nxt is not None:
                        pending.append((nxt, submit(pool, nxt)))
                    method = methods[(cfg.codec, f"{cfg.rate_control}={value:g}")]
                    method.time("encode_ms_per_frame", result.encode_s / seq.num_frames)
                    method.time("decode_ms_per_frame", result.decode_s / seq.num_frames)
                    decoded = (
                        (result.decoded * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
                    )
                    num_bytes = len(result.bitstream)
                    del result
                    method.measure(seq, decoded, num_bytes, info)
                    bar.update(seq.num_frames)
    summaries: dict[str, dict[str, Any]] = {}
    sources: dict[str, dict[str, Any]] = {}
    points = []
    for (codec, label), method in methods.items():
        summary = method.summary()
        summaries.setdefault(codec, {})[label] = summary
        sources.setdefault(codec, {})[label] = method.source
        points.append(method.rd_point(summary))
    return EvaluationResult(
        point="baselines",
        gop=gop,
        metrics=list(metric_set.config.metrics),
        random_backbones=list(metric_set.random_backbones),
        methods=summaries,
        rows=[row for m in methods.values() for row in m.rows],
        points=points,
        sequences=sequences,
        sources=sources,
    )


# ---------------------------------------------------------------------------------------
# files


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_png(path: Path, image: np.ndarray) -> None:
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    if not ok:
        raise EvaluationError(f"{path}: OpenCV cannot encode this image as PNG")
    _write_bytes_atomic(path, buf.tobytes())


def _clear_folder(folder: Path, suffix: str) -> None:
    """Remove this stage's earlier files of one kind (a method may be gone since)."""
    if folder.is_dir():
        for f in folder.glob(f"*{suffix}"):
            f.unlink()


def gop_profile(rows: Sequence[Mapping[str, Any]], gops: Mapping[str, int]) -> list[dict[str, Any]]:
    """Means per position in the GOP (0: the I-frame) of ``bpp`` and every per-frame
    metric of ``rows`` (one method's), with the ``count`` of frames averaged."""
    sums: dict[int, dict[str, float]] = {}
    counts: dict[int, dict[str, int]] = {}
    for row in rows:
        pos = int(row["frame"]) % gops[row["video"]]
        for key, value in row.items():
            if key != "bpp" and not _is_metric_key(key):
                continue
            if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
                continue
            sums.setdefault(pos, {})[key] = sums.get(pos, {}).get(key, 0.0) + value
            counts.setdefault(pos, {})[key] = counts.get(pos, {}).get(key, 0) + 1
        counts.setdefault(pos, {})
        counts[pos]["#"] = counts[pos].get("#", 0) + 1
    out = []
    for pos in sorted(counts):
        entry: dict[str, Any] = {"position": pos, "count": counts[pos]["#"]}
        for key, total in sums.get(pos, {}).items():
            entry[key] = total / counts[pos][key]
        out.append(entry)
    return out


def write_evaluation(result: EvaluationResult, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``result``'s files (module docstring) into ``out_dir``; returns them by name."""
    from pipeline.atomic import write_json_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for sub, suffix in (("by_method", ".csv"), ("gop_profile", ".csv"), ("images", ".png")):
        _clear_folder(out / sub, suffix)
    sources = {"sequences": result.sequences, "methods": result.sources}
    write_json_atomic(out / "sources.json", json_safe(sources))
    written["sources"] = out / "sources.json"
    written["frames"] = write_frame_rows_csv(result.rows, out / "frames.csv")
    for name, path in write_points(result.points, out).items():
        written[name if name in ("json", "csv") else f"by_method/{name}"] = path
    gops = {s["name"]: s["gop"] for s in result.sequences}
    series: dict[str, list[dict[str, Any]]] = {}
    single_point = len({(r["method"], r["point"]) for r in result.rows}) == len(
        {r["method"] for r in result.rows}
    )
    for row in result.rows:
        key = row["method"] if single_point else f"{row['method']}_{row['point']}"
        series.setdefault(key, []).append(row)
    for key, rows in series.items():
        path = out / "gop_profile" / f"{_safe_name(key)}.csv"
        written[f"gop_profile/{key}"] = write_frame_rows_csv(gop_profile(rows, gops), path)
    for name, image in result.images.items():
        path = out / "images" / f"{_safe_name(name)}.png"
        _write_png(path, image)
        written[f"images/{name}"] = path
    # last: its presence means the evaluation's files are complete
    write_json_atomic(out / "metrics.json", result.metrics_json())
    written["metrics"] = out / "metrics.json"
    return written


# ---------------------------------------------------------------------------------------
# report


_REPORT_METRICS = (*PLOT_METRICS, "psnr_y", "tdiff_mae", "tlp")
_METRIC_NAMES = {
    "lpips": "LPIPS",
    "psnr_rgb": "PSNR (RGB)",
    "psnr_y": "PSNR (Y)",
    "ms_ssim": "MS-SSIM",
    "fid": "FID",
    "kid": "KID",
    "tdiff_mae": "temporal diff. MAE",
    "tlp": "tLP",
}
_WHY_ABSENT = {
    "lpips": "not in `evaluate.metrics` (it needs `evaluate.lpips_backbone`)",
    "tlp": "not in `evaluate.metrics` (it needs `evaluate.lpips_backbone`)",
    "fid": "not in `evaluate.metrics` (it needs `evaluate.inception_weights`)",
    "kid": "not in `evaluate.metrics` (it needs `evaluate.inception_weights`)",
}


@dataclass
class ReportResult:
    """What :func:`build_report` read and wrote."""

    points: list[RDPoint]
    plots: list[Path]
    summary_path: Path
    files: dict[str, Path]
    warnings: list[str]
    missing: list[str]


def _metric_present(points: Sequence[RDPoint], metric: str) -> str | None:
    for key in (metric, metric + RANDOM_SUFFIX):
        if any(key in p.metrics for p in points):
            return key
    return None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if math.isinf(value):
            return "inf"
        return f"{value:.4g}"
    return str(value)


def _read_metrics_doc(path: Path) -> dict[str, Any] | None:
    import json

    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def build_report(
    reports_dir: str | os.PathLike[str],
    qualities: Sequence[str],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    summary_path: str | os.PathLike[str] | None = None,
    reference: str = REFERENCE_METHOD,
    bd_metrics: Sequence[str] = BD_METRICS,
) -> ReportResult:
    """RD plots, RD point files and a Markdown summary with BD-rates against ``reference``,
    from ``reports_dir/<quality>/points.json`` and ``reports_dir/baselines/points.json``.

    Writes ``out_dir`` (default ``reports_dir/rd``): ``figures/rd_<metric>.png`` for every
    metric measured, ``points.json``, ``points.csv``, ``by_method/<method>.csv`` (one curve
    per method across the qualities); and ``summary_path`` (default
    ``reports_dir/summary.md``).
    A missing input is listed in the summary; none at all is an error.
    """
    reports = Path(reports_dir)
    out = Path(out_dir) if out_dir is not None else reports / "rd"
    summary_file = Path(summary_path) if summary_path is not None else reports / "summary.md"
    points: list[RDPoint] = []
    missing: list[str] = []
    docs: dict[str, dict[str, Any]] = {}
    for name in [*qualities, "baselines"]:
        path = reports / name / "points.json"
        if not path.is_file():
            missing.append(str(path))
            continue
        points.extend(read_points_json(path))
        doc = _read_metrics_doc(reports / name / "metrics.json")
        if doc is not None:
            docs[name] = doc
    if not points:
        raise EvaluationError(
            f"nothing to report: none of {', '.join(missing)} exists; run the evaluate stages first"
        )
    notes: list[str] = []
    if missing:
        notes.append(f"Missing inputs (not in this report): {', '.join(missing)}.")
    fingerprints = {n: d.get("test_set", {}).get("fingerprint") for n, d in docs.items()}
    if len({f for f in fingerprints.values() if f}) > 1:
        notes.append(
            "The evaluations ran on DIFFERENT test sets (test_set.fingerprint: "
            + ", ".join(f"{n} {f}" for n, f in fingerprints.items())
            + "): rates and qualities are not comparable across them; re-run them with "
            "the same params."
        )
    random = sorted({b for d in docs.values() for b in d.get("random_backbones") or []})
    if random:
        notes.append(
            f"RANDOM backbones ({', '.join(random)}): the `{RANDOM_SUFFIX}` numbers test the "
            "code path only and are not LPIPS/FID/KID."
        )

    plot_metrics = [m for m in _REPORT_METRICS if _metric_present(points, m)]
    _clear_folder(out / "figures", ".png")  # a metric or method may be gone since
    _clear_folder(out / "by_method", ".csv")
    plots = plot_rd_all(points, out / "figures", metrics=plot_metrics)
    files = {f"plot/{p.stem}": p for p in plots}
    for name, path in write_points(points, out).items():
        files[name if name in ("json", "csv") else f"by_method/{name}"] = path

    lines = ["# PLVC evaluation", ""]
    test_set = next((d["test_set"] for d in docs.values() if "test_set" in d), None)
    if test_set:
        gop = next(iter(docs.values())).get("gop")
        lines += [
            f"Test set: {test_set.get('sequences')} sequences, {test_set.get('frames')} frames "
            f"({test_set.get('vimeo_clips')} Vimeo-90k test clips, "
            f"{test_set.get('yuv_sequences')} YUV sequences), centre-cropped to multiples of "
            f"{test_set.get('crop_multiple')} px; GOP {gop} (capped at each sequence's "
            "length). Rates are real bitstream sizes, I-frames included.",
            "",
        ]
    lines += [f"> **Note.** {n}" for n in notes]
    if notes:
        lines.append("")

    lines += [f"## BD-rate against {reference}", ""]
    by_method = curves(points)
    present = {m: _metric_present(points, m) for m in bd_metrics}
    measured = [key for key in present.values() if key]
    if reference not in by_method:
        lines.append(
            f"n/a: no {reference} points (run `evaluate_baselines` with a {reference} entry "
            "in `evaluate.baselines`)."
        )
    elif measured:
        try:
            lines.append(bd_rate_table(points, reference, metrics=measured))
        except BDRateError as exc:
            lines.append(f"n/a: {exc}")
    for metric, key in present.items():
        if key is None:
            why = _WHY_ABSENT.get(metric, "not in `evaluate.metrics`")
            lines.append(
                f"- BD-rate in {_METRIC_NAMES.get(metric, metric)}: n/a: not measured, {why}."
            )
    lines += [
        "",
        'Cells read "n/a" where a curve has fewer than 2 points, is not monotonic, or the '
        "curves share no quality range. Negative: fewer bits than the reference at equal "
        "quality.",
        "",
    ]

    if reference in by_method:
        ref_rates = [p.bpp for p in by_method[reference]]
        lo, hi = min(ref_rates), max(ref_rates)
        outside = [
            f"{p.method} {p.point} ({p.bpp:.4f})"
            for name, pts in by_method.items()
            if name != reference
            for p in pts
            if not lo <= p.bpp <= hi
        ]
        lines += ["## Anchor coverage", "", f"{reference} spans {lo:.4f} to {hi:.4f} bpp."]
        if outside:
            lines.append(
                "Outside it (BD-rates cover only the overlap of two curves; add anchor rate "
                "points to `evaluate.baselines` to cover these): " + ", ".join(outside) + "."
            )
        lines.append("")

    columns = [key for m in _REPORT_METRICS if (key := _metric_present(points, m))]
    lines += ["## Rate-distortion points", ""]
    lines.append("| method | point | bpp | " + " | ".join(columns) + " |")
    lines.append("|---|---|---:|" + "---:|" * len(columns))
    for name, pts in by_method.items():
        for p in pts:
            cells = [_fmt(p.metrics.get(k, math.nan)) for k in columns]
            lines.append(f"| {name} | {p.point} | {p.bpp:.4f} | " + " | ".join(cells) + " |")
    lines += ["", "## Plots", ""]
    for plot in plots:
        rel = os.path.relpath(plot, summary_file.parent)
        lines.append(f"![{plot.stem}]({rel})")
    lines.append("")
    _write_bytes_atomic(summary_file, "\n".join(lines).encode())
    files["summary"] = summary_file
    return ReportResult(points, plots, summary_file, files, notes, missing)


def mlflow_metrics(result: EvaluationResult) -> dict[str, float]:
    """Every finite number of ``result``'s summaries, named ``<method>/<key>`` (anchors:
    ``<codec>/<rate point>/<key>``), in the characters MLflow accepts."""
    out: dict[str, float] = {}

    def visit(prefix: str, node: Mapping[str, Any]) -> None:
        for key, value in node.items():
            name = f"{prefix}/{key}" if prefix else str(key)
            if isinstance(value, Mapping):
                visit(name, value)
            elif (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                safe = "".join(c if c.isalnum() or c in "/_-. " else "_" for c in name)
                out[safe] = float(value)

    visit("", result.methods)
    return out
