"""Coding the test set for real and measuring it: PLVC and HiFiC bitstreams written and decoded
again (:func:`evaluate_quality`), x264/x265 anchors on the same frames (:func:`evaluate_anchors`).
What the numbers mean and the files they go to: ``docs/evaluation.md``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import os
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.eval.metrics import (
    FFMPEG_METRICS,
    FRAME_METRICS,
    RANDOM_SUFFIX,
    SET_METRICS,
    EvaluationError,
    MetricConfig,
    MetricRun,
    MetricSet,
    json_safe,
)
from pipeline.eval.rd import (
    RDPoint,
)

if TYPE_CHECKING:
    from pipeline.config import BaselineSpec, EvaluateConfig
    from pipeline.eval.baselines import BaselineConfig
from pipeline.eval.models import INTRA_METHOD, CachedIntraCodec, PhaseModel, QualityModels
from pipeline.eval.plvc_coding import code_gops_in_parallel, code_serially, to_uint8
from pipeline.eval.rate_search import RateSearch, resolve_rate_points
from pipeline.eval.testset import CROP_MULTIPLE, TestSequence, TestSet
from pipeline.eval.visuals import Visuals, matched_x265_anchor
from plvc.determinism import CodingMode

__all__ = [
    "CHUNK_PIXELS",
    "REFERENCE_METHOD",
    "EvaluationResult",
    "anchor_configs",
    "check_anchors",
    "evaluate_anchors",
    "evaluate_quality",
    "is_metric_key",
    "metric_config",
    "mlflow_metrics",
]


#: the anchor BD-rates are computed against
REFERENCE_METHOD = "x265"


#: pixels measured per chunk of a long sequence (32 frames of 1920x1024)
CHUNK_PIXELS = 32 * 1920 * 1024


def metric_config(cfg: EvaluateConfig, device: str | torch.device) -> MetricConfig:
    """The :class:`MetricConfig` of the ``evaluate`` params."""
    return MetricConfig(
        metrics=tuple(cfg.metrics),
        lpips_backbone=cfg.lpips_backbone,
        inception_weights=cfg.inception_weights,
        allow_random_backbone=cfg.allow_random_backbone,
        device=str(device),
        ffmpeg=None if cfg.ffmpeg is None else str(cfg.ffmpeg),
    )


def _u8_tensor(frames: np.ndarray) -> torch.Tensor:
    """``uint8 [T, H, W, 3]`` -> float ``[T, 3, H, W]`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)


def is_metric_key(key: str) -> bool:
    return key.removesuffix(RANDOM_SUFFIX) in (
        *FRAME_METRICS,
        *FFMPEG_METRICS,
        *SET_METRICS,
        "kid_std",
    )


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
                matrix=seq.matrix,
            )
            for row in rows:
                row["frame"] += start  # the run keeps these dicts: its rows are re-indexed too
                i = row["frame"]
                head = {"method": self.name, "point": self.point, "video": seq.name, "frame": i}
                # the whole sequence's stream: anchors have no per-frame sizes, and BD-rates
                # per sequence (pipeline.eval.bd_classes) need every method's
                size = {"sequence_bytes": num_bytes}
                self.rows.append({**head, **frame_info[i], **size, **row})
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
        kept = {k: v for k, v in summary.items() if is_metric_key(k) or k in ("bpp", "num_frames")}
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


def _code_plvc(
    seq: TestSequence,
    phase: PhaseModel,
    method: _Method,
    gop: int,
    quality: str,
    coding: tuple[CodingMode | None, int],
    bar: Any,
) -> np.ndarray:
    """Encode one sequence with one PLVC model, decode the bytes, check, measure.
    ``coding``: the coding mode and the worker processes (> 1: GOPs in parallel)."""
    mode, workers = coding
    options = {
        "gop": seq.gop(gop),
        "quality": quality,
        "fps": Fraction(seq.fps).limit_denominator(1001),
        "mode": mode,
    }
    if workers > 1:
        coded = code_gops_in_parallel(
            seq.frames,
            phase.model,
            phase.intra,
            workers,
            **options,  # type: ignore[arg-type]
        )
        bar.update(seq.num_frames)
    else:
        coded = code_serially(
            seq.frames,
            phase.model,
            phase.intra,
            bar.update,
            **options,  # type: ignore[arg-type]
        )
    if len(coded.decoded) != seq.num_frames:
        raise EvaluationError(
            f"{method.name} {seq.name}: the stream holds {len(coded.decoded)} frames, "
            f"not {seq.num_frames}"
        )
    for key, values in (
        ("encode_ms_per_pframe", coded.encode_seconds),
        ("decode_ms_per_pframe", coded.decode_seconds),
    ):
        for seconds in values:
            method.time(key, seconds)
    method.mismatches += coded.mismatches
    method.payload_bytes += sum(coded.payloads)
    info = _frame_info(coded.types, coded.payloads, seq.height * seq.width)
    method.measure(seq, coded.decoded, len(coded.data), info)
    return coded.decoded


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
        decoded[i] = to_uint8(image)
        payloads.append(len(payload))
        if i % period == 0:
            intra.remember(x, payload, image)
        bar.update(1)
    method.payload_bytes += sum(payloads)
    info = _frame_info(["I"] * len(payloads), payloads, seq.height * seq.width)
    method.measure(seq, decoded, sum(payloads), info)
    return decoded


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
        """The ``metrics.json`` document (strict JSON: :func:`~pipeline.eval.metrics.json_safe`)."""
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
    coding_mode: CodingMode | None = None,
    workers: int = 1,
    visual_sequences: int = 2,
    ffmpeg: str | None = None,
    chunk_pixels: int = CHUNK_PIXELS,
    progress: bool = True,
) -> EvaluationResult:
    """Code every sequence with every method of ``models`` (real bitstreams, decoded back),
    measure, and draw images for the first ``visual_sequences`` sequences (with x265 at
    the last PLVC phase's rate when ffmpeg is there). ``coding_mode``: how PLVC's networks
    run (default :class:`~plvc.determinism.CodingMode`); ``workers`` > 1: each sequence's
    GOPs coded by that many processes."""
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
            visuals = Visuals(seq, gop) if k < visual_sequences else None
            to_code: list[tuple[_Method, PhaseModel | None]] = [(methods[INTRA_METHOD], None)]
            to_code += [(methods[phase.method], phase) for phase in models.phases]
            for method, phase in to_code:
                if phase is None:
                    decoded = _code_intra(seq, models.intra, method, gop, bar)
                else:
                    coding = (coding_mode, workers)
                    decoded = _code_plvc(seq, phase, method, gop, quality, coding, bar)
                if visuals is not None:
                    visuals.add([method.name, f"{method.sequence_bpp[seq.name]:.4f} bpp"], decoded)
                del decoded
            if visuals is not None:
                last = methods[models.phases[-1].method] if models.phases else methods[INTRA_METHOD]
                target = last.sequence_bpp[seq.name]
                anchor = matched_x265_anchor(seq, target, gop, ffmpeg, visuals.span)
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
    """:class:`pipeline.eval.baselines.BaselineConfig` of every ``evaluate.baselines`` entry; the
    GOP and frame rate are set per sequence."""
    from pipeline.eval.baselines import BaselineConfig

    return [
        BaselineConfig(
            codec=s.codec,
            rate_control=s.rate_control,
            points=tuple(float(p) for p in s.points),
            search=None
            if s.search is None
            else RateSearch(
                bpp_low=s.search.bpp[0],
                bpp_high=s.search.bpp[1],
                points=s.search.points,
                frames=s.search.frames,
                sequences=s.search.sequences,
                values=s.search.values,
            ),
            preset=s.preset,
            ffmpeg=None if ffmpeg is None else str(ffmpeg),
            name=s.name,
            encode=s.encode,
            decode=s.decode,
        )
        for s in specs
    ]


def check_anchors(configs: Sequence[BaselineConfig]) -> None:
    """Fail before any work when ffmpeg or one of its encoders is missing."""
    from pipeline.eval.baselines import CODECS, FFmpegNotFoundError, ffmpeg_encoders, find_ffmpeg
    from pipeline.eval.external_anchor import check_external_program

    for cfg in configs:
        if cfg.external is not None:
            check_external_program(cfg.external)
            continue
        binary = find_ffmpeg(cfg.ffmpeg)
        encoder = CODECS[cfg.codec].encoder
        if encoder not in ffmpeg_encoders(binary):
            raise FFmpegNotFoundError(
                f"{binary} has no {encoder} encoder ({cfg.codec}): set evaluate.ffmpeg to an "
                f"ffmpeg built with {encoder}"
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
    from pipeline.eval.baselines import CODECS, encode_decode, ffmpeg_version, find_ffmpeg

    check_anchors(configs)
    configs, searches = resolve_rate_points(test_set, configs, gop=gop)
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
        if cfg.external is not None:
            source: dict[str, Any] = {
                "encoder": cfg.external.programs()[0],
                "encode_template": cfg.encode,
                "decode_template": cfg.decode,
            }
        else:
            source = {
                "encoder": CODECS[cfg.codec].encoder,
                "preset": cfg.preset or CODECS[cfg.codec].default_preset,
                "tune": cfg.tune if cfg.codec in ("x264", "x265") else None,
                "ffmpeg": ffmpeg_version(find_ffmpeg(cfg.ffmpeg)),
            }
        if cfg.method in searches:
            source["rate_search"] = searches[cfg.method].describe()
        methods[(cfg.method, label)] = _Method(
            cfg.method, label, metric_set, chunk_pixels, **source
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
                return pool.submit(
                    encode_decode,
                    frames,  # noqa: B023
                    per_sequence,
                    value,
                    matrix=seq.matrix,  # noqa: B023
                )

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
                    method = methods[(cfg.method, f"{cfg.rate_control}={value:g}")]
                    # the first sequence's command line (temp paths and all): what ran
                    method.source.setdefault("command", " ".join(result.command))
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
