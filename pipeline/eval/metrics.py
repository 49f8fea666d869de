"""Quality metrics of decoded video against the originals (paper, "Experiments").

Per frame: PSNR on RGB and on luma, MS-SSIM, LPIPS (AlexNet, as the paper). Per set of
frames: FID and KID (Inception-v3 pool features), and two temporal-consistency measures so
flicker shows as a number. Everything a stage needs goes through :class:`MetricSet`::

    metric_set = MetricSet(MetricConfig(lpips_backbone=..., inception_weights=...))
    run = metric_set.start()
    for name, originals, decoded, nbytes in videos:      # [T, 3, H, W] float in [0, 1]
        run.add_video(name, originals, decoded, num_bytes=nbytes)
    result = run.finish()                                # .rows (per frame), .summary

Conventions (all documented here once):

* Frames are RGB float ``[T, 3, H, W]`` in ``[0, 1]``. With ``quantize_8bit`` (default)
  both sides are rounded to the 8-bit grid first: what a decoder writes to a file.
* PSNR is ``10 log10(1 / MSE)`` per frame on ``[0, 1]`` values (float64), averaged over
  frames (the frame-averaged PSNR video coding reports). Identical frames give
  ``float('inf')``; the frame average is then ``inf`` too. JSON has no infinity, so
  :func:`json_safe` writes ``"inf"`` / ``"-inf"`` strings and ``null`` for NaN, and
  :func:`from_json_safe` reads them back.
* PSNR-Y converts RGB to luma with BT.601 (default) or BT.709 *limited* range
  (Y in 16..235, as ``plvc.video_io`` and YUV test sequences), peak 255.
* MS-SSIM (Wang et al. 2003) is torchmetrics' with an 11x11 Gaussian window (sigma 1.5),
  the standard five scale weights, and negative contrast terms clipped at 0 (the
  pytorch-msssim convention; values agree with pytorch-msssim to ~1e-3). Five scales need
  each side >= 176 px (> 160 in theory; torchmetrics checks side // 16 > 10). **Smaller
  frames** (e.g. CIF 176x144) use the most scales that fit, with the first weights
  renormalised to sum to 1; the number used is reported per frame (``ms_ssim_scales``)
  and in the summary (``ms_ssim_scales_min``, ``ms_ssim_reduced_scales``), so a
  reduced-scale value is never mistaken for the standard one. Sides <= 10 px are refused.
* LPIPS: ``lpips`` 0.1.4, AlexNet trunk, v0.1 linear layers (shipped in the package).
  The trunk's ImageNet weights are torchvision's ``alexnet-owt-7be5be79.pth``, taken
  from ``lpips_backbone`` (param ``evaluate.lpips_backbone``) or torch's hub cache.
* FID / KID: Inception-v3 2048-d pool features of torch-fidelity's port of the TF
  reference network (``weights-inception-2015-12-05-6726825d.pth``, param
  ``evaluate.inception_weights`` or torch's hub cache), images resized to 299 the TF
  way (not torchmetrics' antialiased default) so values compare with published ones.
  The statistics are torchmetrics' (FID: Fréchet distance; KID: unbiased polynomial
  MMD over ``kid_subsets`` random subsets of ``min(kid_subset_size, N)`` frames, seeded).
  With ``fid_patch_size = P``, each frame is cut into non-overlapping PxP patches plus
  a second grid shifted by P/2, as HiFiC (Mentzer et al. 2020) does, which gives many
  more samples than whole frames.
* Temporal consistency, for frame t >= 1 of each video (``NaN`` for frame 0):

  - ``tdiff_mae`` = mean |(x̂_t - x̂_{t-1}) - (x_t - x_{t-1})| in 8-bit units: how far
    the decoded frame-to-frame change is from the original's. 0 for identical videos;
    flicker (changes the original does not have) raises it.
  - ``tlp`` (tLP of TecoGAN, Chu et al. 2020) = |LPIPS(x̂_t, x̂_{t-1}) - LPIPS(x_t, x_{t-1})|:
    the same idea in LPIPS space (needs the LPIPS backbone).

Missing backbone weights raise :class:`MissingWeightsError` naming the param. For tests,
``allow_random_backbone=True`` uses seeded random trunks instead, and every affected
output key carries the suffix ``_random_init`` (``lpips_random_init``,
``fid_random_init``, ...) and the summary lists them under ``random_backbones``: such
numbers are not LPIPS/FID and must never be reported as such.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from pipeline.backbones import (
    InceptionFeatures,
    MissingWeightsError,
    default_alexnet_path,
    default_inception_path,
    load_inception,
    load_lpips,
    resolve_weights,
)
from pipeline.errors import PipelineError

__all__ = [
    "ALL_METRICS",
    "FFMPEG_METRICS",
    "FRAME_METRICS",
    "MS_SSIM_WEIGHTS",
    "RANDOM_SUFFIX",
    "SET_METRICS",
    "EvaluationError",
    "MetricConfig",
    "MetricResult",
    "MetricRun",
    "MetricSet",
    "bits_per_pixel",
    "frechet_distance",
    "from_json_safe",
    "json_safe",
    "ms_ssim",
    "ms_ssim_scales",
    "psnr",
    "rgb_to_luma",
]


#: per-frame metrics (``tdiff_mae`` and ``tlp`` are per frame t >= 1)
FRAME_METRICS = ("psnr_rgb", "psnr_y", "psnr_yuv", "ms_ssim", "lpips", "tdiff_mae", "tlp")


#: per-frame metrics computed by ffmpeg (:mod:`pipeline.eval.ffmpeg_metrics`)
FFMPEG_METRICS = ("vmaf", "vmaf_neg", "xpsnr")


#: metrics over the whole set of frames
SET_METRICS = ("fid", "kid")


ALL_METRICS = FRAME_METRICS + FFMPEG_METRICS + SET_METRICS


#: suffix of every output key computed with a random (untrained) backbone
RANDOM_SUFFIX = "_random_init"


#: Wang et al. 2003, the five scale exponents
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


_MS_SSIM_WINDOW = 11


_LUMA = {"bt601": (0.299, 0.587, 0.114), "bt709": (0.2126, 0.7152, 0.0722)}


class EvaluationError(PipelineError):
    """Evaluation cannot go on: bad frames, bad settings, a failing baseline encoder."""


def bits_per_pixel(
    num_bytes: int | Iterable[bytes | int], frames: int, height: int, width: int
) -> float:
    """bpp = all bytes x 8 / (frames x H x W) (DESIGN §5).

    ``num_bytes`` is a byte count or an iterable of bitstreams (``bytes``) and/or counts,
    e.g. the I-frame's and each P-frame's strings together.
    """
    if isinstance(num_bytes, int):
        total = num_bytes
    else:
        total = sum(
            len(b) if isinstance(b, bytes | bytearray | memoryview) else int(b) for b in num_bytes
        )
    if total < 0:
        raise EvaluationError(f"byte count must be >= 0, got {total}")
    if frames <= 0 or height <= 0 or width <= 0:
        raise EvaluationError(
            f"bpp needs positive frames x H x W, got {frames} x {height} x {width}"
        )
    return total * 8 / (frames * height * width)


def psnr(x: Tensor, y: Tensor, peak: float = 1.0) -> Tensor:
    """Per-image PSNR in dB of ``[N, C, H, W]`` tensors, float64; identical images give inf."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(dim=1)
    # 10 log10(peak^2 / 0) = +inf, which is what identical frames should report
    with torch.no_grad():
        return 10.0 * torch.log10(peak**2 / mse)


def rgb_to_luma(x: Tensor, matrix: Literal["bt601", "bt709"] = "bt601") -> Tensor:
    """RGB ``[N, 3, H, W]`` in [0, 1] -> limited-range luma ``[N, 1, H, W]`` (8-bit units)."""
    kr, kg, kb = _LUMA[matrix]
    r, g, b = x.double().unbind(dim=1)
    return (16.0 + 219.0 * (kr * r + kg * g + kb * b)).unsqueeze(1)


def ms_ssim_scales(height: int, width: int, window: int = _MS_SSIM_WINDOW) -> int:
    """How many MS-SSIM scales (<= 5) frames of this size allow with an 11x11 window.

    Scale s needs each side > (window - 1) x 2^(s-1) (the coarsest image must hold a
    window; 5 scales: > 160 px) and torchmetrics' own size check. 0: not even one.
    """
    for scales in range(len(MS_SSIM_WEIGHTS), 0, -1):
        fits = min(height, width) > (window - 1) * 2 ** (scales - 1)
        tm_div = max(1, scales - 1) ** 2  # torchmetrics checks side // (s-1)^2 > window - 1
        tm_fits = height // tm_div > window - 1 and width // tm_div > window - 1
        if fits and tm_fits and min(height, width) >= 2**scales:
            return scales
    return 0


def ms_ssim(x: Tensor, y: Tensor, scales: int | None = None) -> Tensor:
    """Per-image MS-SSIM of ``[N, 3, H, W]`` in [0, 1]; fewer ``scales`` for small frames."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    h, w = x.shape[-2:]
    scales = ms_ssim_scales(h, w) if scales is None else scales
    if scales < 1:
        raise EvaluationError(
            f"frames of {w}x{h} are too small for MS-SSIM (each side must be > 10 px)"
        )
    weights = MS_SSIM_WEIGHTS[:scales]
    betas = tuple(float(b / sum(weights)) for b in weights)
    # float32: ~15x cheaper than float64 on CPU, within 1.5e-5 of it on 8-bit frames
    return multiscale_structural_similarity_index_measure(
        y.float(),
        x.float(),
        data_range=1.0,
        kernel_size=_MS_SSIM_WINDOW,
        sigma=1.5,
        betas=betas,
        normalize="relu",
        reduction="none",
    ).double()


def json_safe(obj: Any) -> Any:
    """Recursively make ``obj`` strict JSON: inf -> ``"inf"``, -inf -> ``"-inf"``, NaN -> null.

    Tensors and numpy scalars become Python numbers; paths become strings.
    """
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Tensor):
        return json_safe(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        obj = obj.item()
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
    return obj


def from_json_safe(obj: Any) -> Any:
    """Inverse of :func:`json_safe` for numbers: ``"inf"``/``"-inf"`` back to floats."""
    if isinstance(obj, dict):
        return {k: from_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_json_safe(v) for v in obj]
    if obj == "inf":
        return math.inf
    if obj == "-inf":
        return -math.inf
    return obj


@dataclass(frozen=True)
class MetricConfig:
    """What to measure and where the backbones come from (the ``evaluate.*`` params)."""

    #: subset of :data:`ALL_METRICS`; leave out a metric whose backbone is absent
    metrics: tuple[str, ...] = FRAME_METRICS + SET_METRICS
    #: torchvision AlexNet weights for LPIPS (None: torch hub cache)
    lpips_backbone: Path | str | None = None
    #: torch-fidelity Inception weights for FID/KID (None: torch hub cache)
    inception_weights: Path | str | None = None
    #: tests only: random trunks, every affected key suffixed with ``_random_init``
    allow_random_backbone: bool = False
    #: round both sides to 8 bits before measuring
    quantize_8bit: bool = True
    luma_matrix: Literal["bt601", "bt709"] = "bt601"
    #: None: whole frames for FID/KID; P: HiFiC-style PxP patches (+ a grid shifted by P/2)
    fid_patch_size: int | None = None
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    #: frames per forward pass of the backbones
    batch_size: int = 8
    device: str = "cpu"
    seed: int = 0
    #: ffmpeg for VMAF/XPSNR (the ``evaluate.ffmpeg`` param; None: the imageio-ffmpeg binary)
    ffmpeg: str | None = None

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in ALL_METRICS]
        if unknown:
            raise EvaluationError(
                f"evaluate.metrics: unknown metric(s) {unknown}; choose from {list(ALL_METRICS)}"
            )
        if self.fid_patch_size is not None and self.fid_patch_size < 16:
            raise EvaluationError(
                f"evaluate.fid_patch_size must be >= 16 or null, got {self.fid_patch_size}"
            )
        if self.kid_subsets < 1 or self.kid_subset_size < 2:
            raise EvaluationError(
                "evaluate.kid_subsets must be >= 1 and evaluate.kid_subset_size >= 2"
            )
        if self.batch_size < 1:
            raise EvaluationError(f"evaluate.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class MetricResult:
    """Per-frame ``rows`` (one dict per frame of every video) and the set's ``summary``."""

    rows: list[dict[str, Any]]
    summary: dict[str, Any]


@dataclass
class _Totals:
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        if math.isnan(value):
            return
        self.sums[key] = self.sums.get(key, 0.0) + value
        self.counts[key] = self.counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


class MetricSet:
    """Loads the backbones a :class:`MetricConfig` asks for, once; measures videos.

    Construction fails at once (before any encoding) when a selected metric's weights
    are missing: :class:`MissingWeightsError` names ``evaluate.lpips_backbone`` or
    ``evaluate.inception_weights``.
    """

    def __init__(self, config: MetricConfig | None = None) -> None:
        self.config = config or MetricConfig()
        cfg = self.config
        self.device = torch.device(cfg.device)
        self.random_backbones: list[str] = []
        self._lpips: nn.Module | None = None
        self._inception: nn.Module | None = None
        wanted = set(cfg.metrics)
        if wanted & {"lpips", "tlp"}:
            path = self._weights(
                cfg.lpips_backbone,
                default_alexnet_path(),
                "evaluate.lpips_backbone",
                "LPIPS AlexNet backbone weights",
                "lpips",
            )
            self._lpips = load_lpips(path, cfg.seed).to(self.device)
        if wanted & set(SET_METRICS):
            path = self._weights(
                cfg.inception_weights,
                default_inception_path(),
                "evaluate.inception_weights",
                "FID/KID Inception-v3 weights",
                "inception",
            )
            self._inception = load_inception(path, cfg.seed).to(self.device)

    def _weights(
        self, explicit: Path | str | None, cached: Path, param: str, what: str, backbone: str
    ) -> Path | None:
        try:
            return resolve_weights(explicit, cached, param, what)
        except MissingWeightsError:
            if explicit is None and self.config.allow_random_backbone:
                warnings.warn(
                    f"{what} absent: RANDOM backbone, outputs suffixed {RANDOM_SUFFIX}",
                    stacklevel=3,
                )
                self.random_backbones.append(backbone)
                return None
            raise

    def key(self, metric: str) -> str:
        """Output key of ``metric``: suffixed with ``_random_init`` when its backbone is random."""
        backbone = {
            "lpips": "lpips",
            "tlp": "lpips",
            "fid": "inception",
            "kid": "inception",
            "kid_std": "inception",
            "kid_subset_size": "inception",
        }.get(metric)
        return metric + RANDOM_SUFFIX if backbone in self.random_backbones else metric

    def start(self) -> MetricRun:
        """A new accumulation over a set of videos."""
        return MetricRun(self)

    def evaluate(
        self, originals: Tensor, decoded: Tensor, video: str = "video", num_bytes: int | None = None
    ) -> MetricResult:
        """Measure one video (FID/KID over its frames alone)."""
        run = self.start()
        run.add_video(video, originals, decoded, num_bytes=num_bytes)
        return run.finish()

    # -- per-batch primitives -------------------------------------------------------------

    def _lpips_distance(self, a: Tensor, b: Tensor) -> Tensor:
        assert self._lpips is not None
        out = []
        for i in range(0, a.shape[0], self.config.batch_size):
            sl = slice(i, i + self.config.batch_size)
            out.append(
                self._lpips(a[sl].to(self.device), b[sl].to(self.device), normalize=True).flatten()
            )
        return torch.cat(out).double().cpu()

    def _inception_features(self, frames: Tensor) -> Tensor:
        assert self._inception is not None
        p = self.config.fid_patch_size
        if p is not None:
            frames = _hific_patches(frames, p)
        out = []
        for i in range(0, frames.shape[0], self.config.batch_size):
            batch = frames[i : i + self.config.batch_size].to(self.device)
            as_u8 = (batch * 255).round().clamp(0, 255).to(torch.uint8)
            out.append(self._inception(as_u8).double().cpu())
        return torch.cat(out)


def _hific_patches(frames: Tensor, p: int) -> Tensor:
    """Non-overlapping PxP patches, plus the same grid shifted by P/2 (HiFiC's FID protocol)."""
    h, w = frames.shape[-2:]
    if h < p or w < p:
        raise EvaluationError(f"evaluate.fid_patch_size = {p} is larger than the frames ({w}x{h})")
    patches = [
        frames.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, p, p)
    ]
    s = p // 2
    if h - s >= p and w - s >= p:
        shifted = frames[:, :, s:, s:]
        patches.append(
            shifted.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, p, p)
        )
    return torch.cat(patches)


class MetricRun:
    """Accumulates videos of one set; :meth:`finish` computes FID/KID and the summary."""

    def __init__(self, metric_set: MetricSet) -> None:
        self._ms = metric_set
        self.rows: list[dict[str, Any]] = []
        self._totals = _Totals()
        self._real: list[Tensor] = []
        self._fake: list[Tensor] = []
        self._bytes: int | None = 0
        self._pixels = 0
        self._scales: list[int] = []
        self._videos = 0

    @torch.no_grad()
    def add_video(
        self,
        video: str,
        originals: Tensor,
        decoded: Tensor,
        num_bytes: int | None = None,
        matrix: str | None = None,
    ) -> list[dict[str, Any]]:
        """Measure one video; returns (and keeps) its per-frame rows.

        ``num_bytes``: all bitstream bytes of this video; when every video gives it the
        summary holds the set's ``bpp`` (total bits / total pixels). ``matrix``: the video's
        YCbCr matrix for Y-PSNR and the ffmpeg metrics (default: the config's ``luma_matrix``).
        """
        ms, cfg = self._ms, self._ms.config
        luma_matrix: Any = matrix or cfg.luma_matrix
        x, x_hat = _check_frames(video, originals, decoded)
        if cfg.quantize_8bit:
            x, x_hat = _to_8bit(x), _to_8bit(x_hat)
        t, _, h, w = x.shape
        wanted = set(cfg.metrics)
        # metrics run in float32/64 even when the caller is inside a bf16 autocast region
        with torch.autocast(device_type=ms.device.type, enabled=False):
            cols: dict[str, list[float]] = {}
            if "psnr_rgb" in wanted:
                cols["psnr_rgb"] = psnr(x, x_hat).tolist()
            if "psnr_y" in wanted:
                cols["psnr_y"] = psnr(
                    rgb_to_luma(x, luma_matrix), rgb_to_luma(x_hat, luma_matrix), peak=255.0
                ).tolist()
            if "psnr_yuv" in wanted:
                from pipeline.eval.yuv_metrics import yuv420_psnr

                cols["psnr_yuv"] = yuv420_psnr(x, x_hat, luma_matrix)
            scales = 0
            if "ms_ssim" in wanted:
                scales = ms_ssim_scales(h, w)
                if scales < len(MS_SSIM_WEIGHTS) and scales not in self._scales:
                    warnings.warn(
                        f"{video}: {w}x{h} frames allow {scales} MS-SSIM scales, not 5",
                        stacklevel=3,
                    )
                cols["ms_ssim"] = torch.cat(
                    [
                        ms_ssim(
                            x[i : i + cfg.batch_size].to(ms.device),
                            x_hat[i : i + cfg.batch_size].to(ms.device),
                            scales,
                        ).cpu()
                        for i in range(0, t, cfg.batch_size)
                    ]
                ).tolist()
                self._scales.append(scales)
            if "lpips" in wanted:
                cols[ms.key("lpips")] = ms._lpips_distance(x, x_hat).tolist()
            nan = [math.nan]
            if "tdiff_mae" in wanted:
                d = (x_hat[1:].double() - x_hat[:-1].double()) - (x[1:].double() - x[:-1].double())
                cols["tdiff_mae"] = nan + (d.abs().flatten(1).mean(dim=1) * 255.0).tolist()
            if "tlp" in wanted:
                if t > 1:
                    lp_hat = ms._lpips_distance(x_hat[1:], x_hat[:-1])
                    lp = ms._lpips_distance(x[1:], x[:-1])
                    cols[ms.key("tlp")] = nan + (lp_hat - lp).abs().tolist()
                else:
                    cols[ms.key("tlp")] = nan
            if wanted & set(FFMPEG_METRICS):
                from pipeline.eval.ffmpeg_metrics import ffmpeg_frame_metrics

                cols.update(
                    ffmpeg_frame_metrics(
                        x, x_hat, wanted, video=video, ffmpeg=cfg.ffmpeg, matrix=luma_matrix
                    )
                )
            if wanted & set(SET_METRICS):
                self._real.append(ms._inception_features(x))
                self._fake.append(ms._inception_features(x_hat))

        rows = []
        for i in range(t):
            row: dict[str, Any] = {"video": video, "frame": i}
            for k, v in cols.items():
                row[k] = v[i]
                self._totals.add(k, v[i])
            if scales:
                row["ms_ssim_scales"] = scales
            rows.append(row)
        self.rows.extend(rows)
        self._videos += 1
        self._pixels += t * h * w
        self._bytes = None if num_bytes is None or self._bytes is None else self._bytes + num_bytes
        return rows

    def finish(self) -> MetricResult:
        """Set-level metrics (FID, KID), frame-averaged per-frame metrics, flags."""
        ms = self._ms
        if not self._videos:
            raise EvaluationError("no video was measured")
        summary: dict[str, Any] = dict(self._totals.means())
        summary["num_frames"] = len(self.rows)
        summary["num_videos"] = self._videos
        if self._bytes is not None:
            summary["bpp"] = self._bytes * 8 / self._pixels
        if self._scales:
            summary["ms_ssim_scales_min"] = min(self._scales)
            summary["ms_ssim_reduced_scales"] = min(self._scales) < len(MS_SSIM_WEIGHTS)
        if self._real:
            summary.update(self._set_metrics(torch.cat(self._real), torch.cat(self._fake)))
        summary["random_backbones"] = list(ms.random_backbones)
        return MetricResult(rows=self.rows, summary=summary)

    def _set_metrics(self, real: Tensor, fake: Tensor) -> dict[str, float]:
        from torchmetrics.image.kid import KernelInceptionDistance

        ms, cfg = self._ms, self._ms.config
        n = min(real.shape[0], fake.shape[0])
        if n < 2:
            raise EvaluationError(f"FID/KID need at least 2 frames (or patches) per set, got {n}")
        out: dict[str, float] = {}
        if "fid" in cfg.metrics:
            out[ms.key("fid")] = frechet_distance(real, fake)
        if "kid" in cfg.metrics:
            subset = min(cfg.kid_subset_size, n)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
                kid = KernelInceptionDistance(
                    feature=InceptionFeatures(real.shape[1]),
                    subsets=cfg.kid_subsets,
                    subset_size=subset,
                )
            kid.update(real, real=True)
            kid.update(fake, real=False)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                mean, std = kid.compute()
            out[ms.key("kid")] = float(mean)
            out[ms.key("kid_std")] = float(std)
            out[ms.key("kid_subset_size")] = subset
        out["fid_kid_samples"] = n
        return out


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance of two feature sets ``[N, d]`` (FID when they are Inception features).

    ``|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2)`` with unbiased covariances, as
    torchmetrics and pytorch-fid define it. The matrix square root is not taken on the
    d x d product (torchmetrics' general eigendecomposition of a 2048 x 2048 matrix takes
    minutes on a small CPU): with centred features A, B, ``tr sqrt(S1 S2)`` equals the
    nuclear norm of ``A B^T / sqrt((N1-1)(N2-1))``, an N1 x N2 SVD, exact and cheap while
    N <= d; for larger sets the symmetric form ``tr sqrt(S1^1/2 S2 S1^1/2)`` (two ``eigh``).
    """
    a = real.double()
    b = fake.double()
    n1, n2, d = a.shape[0], b.shape[0], a.shape[1]
    if n1 < 2 or n2 < 2:
        raise EvaluationError(f"the Fréchet distance needs >= 2 samples per set, got {n1} and {n2}")
    mu1, mu2 = a.mean(dim=0), b.mean(dim=0)
    a = a - mu1
    b = b - mu2
    tr1 = a.pow(2).sum() / (n1 - 1)
    tr2 = b.pow(2).sum() / (n2 - 1)
    if max(n1, n2) <= d:
        tr_sqrt = torch.linalg.svdvals(a @ b.T).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    else:
        s1 = a.T @ a / (n1 - 1)
        s2 = b.T @ b / (n2 - 1)
        w, v = torch.linalg.eigh(s1)
        root1 = (v * w.clamp(min=0).sqrt()) @ v.T
        tr_sqrt = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0).sqrt().sum()
    # >= 0 mathematically; identical sets give round-off of either sign
    return max(float((mu1 - mu2).pow(2).sum() + tr1 + tr2 - 2 * tr_sqrt), 0.0)


def _check_frames(video: str, originals: Tensor, decoded: Tensor) -> tuple[Tensor, Tensor]:
    for name, t in (("originals", originals), ("decoded", decoded)):
        if not isinstance(t, Tensor) or t.dim() != 4 or t.shape[1] != 3:
            shape = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise EvaluationError(f"{video}: {name} must be a [T, 3, H, W] tensor, got {shape}")
        if not t.is_floating_point():
            raise EvaluationError(f"{video}: {name} must be float in [0, 1], got {t.dtype}")
    if originals.shape != decoded.shape:
        raise EvaluationError(
            f"{video}: decoded frames {list(decoded.shape)} do not match "
            f"the originals {list(originals.shape)}"
        )
    if originals.shape[0] == 0:
        raise EvaluationError(f"{video}: no frames")
    return originals.detach().float().cpu(), decoded.detach().float().cpu()


def _to_8bit(x: Tensor) -> Tensor:
    return x.clamp(0, 1).mul(255).round().div(255)
