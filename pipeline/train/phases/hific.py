"""HiFiC's two training phases (Mentzer et al., "High-Fidelity Generative Image Compression",
NeurIPS 2020, section 4 "Training"), as :class:`~pipeline.train.phase.TrainingPhase` dataclasses.

- :class:`HiFiCWarmupPhase`: the rate-distortion(-perception) model HiFiC's GAN stage starts
  from: ``L = λ' r(y) + k_M MSE + k_P LPIPS`` with the target-switching rate weight λ'
  (``λ_a`` above the target rate, ``λ_b`` below; :mod:`plvc.hific_losses`), no D.
- :class:`HiFiCGANPhase`: the same loss plus ``β · −log D(x̂, ŷ)``; per iteration one step of
  the conditional discriminator D(x, ŷ) on real and fake images in one batch (non-saturating
  ``−log D(x) − log(1 − D(x̂))``), then one generator step with D frozen.

Data: still-encoded septuplets from the shards
(:func:`pipeline.data.datasets.read_encoded_septuplets_ray`; decoded clips from
:func:`~pipeline.data.datasets.read_septuplets_ray` work too). Every frame is a usable training
image: each step draws ``frames_per_clip`` distinct frames of each clip, decodes only those
(decoding all seven in the reader made the sample run wait on data 75% of the time), and cuts
an independent random ``crop`` x ``crop`` window (and flip) from each, so ``batch_size``
clips give ``batch_size * frames_per_clip`` independent images. The draws use the worker's
torch RNG, which checkpoints restore, so a resumed run continues exactly; and they are fresh
every step, where crops fixed per clip by the reader (its ``epoch`` argument) would repeat
the same windows in every epoch. With ``frames_per_clip = 7`` the batch holds all frames of
each clip.

The loss's own warm-up schedule (the release's first 50k steps: raised rate target, halved
rate weight; :class:`~plvc.hific_losses.HiFiCLossWeights`) and the LR milestones start over in
the GAN phase, as in the release (``hific.gan_schedules: restart``), or count on from the
warm-up's steps (``continue``: ``step_offset`` of the GAN phase = the warm-up's steps).

LPIPS (``k_p > 0``) needs AlexNet weights that cannot be downloaded here:
``hific.lpips_backbone`` names a torchvision AlexNet state dict (``alexnet-owt-*.pth``);
:meth:`HiFiCWarmupPhase.load_lpips` reads and checks it on the driver before Ray starts
(:func:`pipeline.backbones.load_lpips_trunk`) and ships the trunk to the workers with the phase.
The linear LPIPS v0.1 heads ship with the ``lpips`` package.

Export: ``hific.pt`` (:func:`plvc.hific.save_hific`, entropy-coder tables refreshed), which
``load_hific``, the registered ``"hific"`` intra codec and the ``iframes`` stage read; the GAN
phase adds ``discriminator.pt`` (a state dict) so a later run can continue it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.backbones import build_lpips, load_lpips_trunk
from pipeline.config import ConfigError, Params
from pipeline.data.clips import batch_to_tensor, decode_png_rgb
from pipeline.images import image_grid
from pipeline.train.phase import (
    DataError,
    PhaseModels,
    PhaseOptimizers,
    RunnerError,
    TrainingPhase,
    compressai_optimizers,
)
from plvc.errors import WeightsError
from plvc.hific import HiFiC, HiFiCConfig, HiFiCDiscriminator, load_hific, save_hific
from plvc.hific_losses import HiFiCLossWeights, discriminator_loss, hific_generator_loss

__all__ = [
    "LPIPS_PARAM",
    "HiFiCGANPhase",
    "HiFiCWarmupPhase",
    "ImageCropBatches",
    "hific_phases",
    "random_frame_crops",
]

#: the param naming the AlexNet weights LPIPS needs
LPIPS_PARAM = "hific.lpips_backbone"

# the generator terms worth a curve in MLflow (hific_generator_loss returns a few more)
_LOGGED_TERMS = (
    "loss",
    "bpp",
    "bpp_y",
    "bpp_z",
    "bpp_quantized",
    "mse",
    "rate_weight",
    "target_bpp",
    "weighted_rate",
    "weighted_mse",
)


# ---------------------------------------------------------------------------------------
# phases


def _is_encoded(clip: Any) -> bool:
    """A clip given as its PNG files' bytes (not decoded pixels)."""
    if isinstance(clip, np.ndarray) and clip.dtype != object:
        return False
    return len(clip) > 0 and isinstance(clip[0], bytes | bytearray | memoryview)


def _decode_frame(png: Any, where: str, t: int) -> np.ndarray:
    try:
        return decode_png_rgb(png)
    except ValueError as exc:
        raise DataError(f"{where}, frame im{t + 1}.png: {exc}") from exc


def random_frame_crops(
    rows: Mapping[str, np.ndarray],
    device: torch.device,
    *,
    frames_per_clip: int,
    crop: int,
    random_flip: bool,
    label: str,
) -> Tensor:
    """Training images of an image codec from a batch of clips: ``frames_per_clip`` distinct
    random frames of each clip, each with its own random ``crop`` x ``crop`` window (and flip),
    as float [B * frames_per_clip, 3, crop, crop] in [0, 1] on ``device``. Draws use the
    worker's torch RNG (seeded per rank, restored on resume); encoded clips decode only the
    drawn frames. ``label`` starts every error message (the phase)."""
    frames = rows.get("frames")
    if frames is None or not (frames.ndim == 5 or frames.dtype == object):
        shape = None if frames is None else frames.shape
        raise DataError(f"{label}: expected 'frames' [B, T, H, W, 3], got {shape}")
    clip_ids = rows.get("clip_id")
    images = []
    for index, clip in enumerate(frames):
        where = f"clip {clip_ids[index]}" if clip_ids is not None else f"batch row {index}"
        encoded = _is_encoded(clip)
        if not encoded and (clip.ndim != 4 or clip.shape[-1] != 3 or clip.dtype != np.uint8):
            raise DataError(
                f"{label}: {where} must be uint8 [T, H, W, 3] or a sequence "
                f"of PNGs, got {clip.dtype} {clip.shape}"
            )
        # the worker's torch RNG: seeded per rank and restored on resume
        chosen = torch.rand(len(clip)).argsort()[:frames_per_clip].tolist()
        for t in chosen:
            image = _decode_frame(clip[t], where, t) if encoded else clip[t]
            height, width = image.shape[:2]
            if height < crop or width < crop:
                raise DataError(
                    f"{label}: frames of {width}x{height} are smaller than the "
                    f"{crop}x{crop} crop (hific.crop)"
                )
            top = int(torch.randint(0, height - crop + 1, ()))
            left = int(torch.randint(0, width - crop + 1, ()))
            image = image[top : top + crop, left : left + crop]
            if random_flip and bool(torch.rand(()) < 0.5):
                image = image[:, ::-1]
            images.append(image)
    return batch_to_tensor(np.stack(images), device, non_blocking=True)


class ImageCropBatches:
    """What every image-codec phase on clips shares (HiFiC's phases, the CompressAI anchor):
    batches of :func:`random_frame_crops`, the model called on them, and CompressAI's
    net/aux optimizer split. The phase defines ``frames_per_clip``, ``crop``, ``random_flip``,
    ``lr`` and ``aux_lr``."""

    name: ClassVar[str]
    frames_per_clip: int
    crop: int
    random_flip: bool
    lr: float
    aux_lr: float

    def build_optimizers(self, models: PhaseModels) -> PhaseOptimizers:
        net, aux = compressai_optimizers(models.generator, self.lr, self.aux_lr)
        return PhaseOptimizers(net, aux)

    def prepare_batch(self, rows: Mapping[str, np.ndarray], device: torch.device) -> Tensor:
        """``frames`` of B clips -> ``frames_per_clip`` random frames per clip, each randomly
        cropped (and flipped), as float images [B * frames_per_clip, 3, crop, crop] in [0, 1]
        on ``device``.

        ``frames`` is either decoded (uint8 [B, T, H, W, 3], or B arrays [T, H, W, 3] of
        several sizes) or still encoded (B sequences of T PNGs, from
        :func:`pipeline.data.datasets.read_encoded_septuplets_ray`), in which case only the drawn
        frames are decoded. Both give the same images for the same RNG state.
        """
        return random_frame_crops(
            rows,
            device,
            frames_per_clip=self.frames_per_clip,
            crop=self.crop,
            random_flip=self.random_flip,
            label=f"phase {self.name!r}",
        )

    def forward(self, models: PhaseModels, batch: Tensor, step: int) -> dict[str, Any]:
        return {"x": batch, **models.generator(batch)}


@dataclasses.dataclass
class HiFiCWarmupPhase(ImageCropBatches, TrainingPhase):
    """HiFiC without D: rate (target switching) + k_M·MSE + k_P·LPIPS.

    Fields are the settings a resumed run must share (compared by the runner).
    """

    name: ClassVar[str] = "hific_warmup"

    model: HiFiCConfig
    loss: HiFiCLossWeights
    lr: float = 1e-4
    aux_lr: float = 1e-3
    #: clips per worker per step
    batch_size: int = 8
    #: distinct frames drawn from each clip per step (1..7)
    frames_per_clip: int = 1
    #: side of the square random crop cut from each drawn frame
    crop: int = 256
    #: mirror each cropped image horizontally with probability 1/2
    random_flip: bool = True
    #: steps before this phase, for the loss's warm-up schedule and the LR milestones
    step_offset: int = 0
    #: HiFiC steps (counting step_offset) at which G's learning rate is multiplied by lr_gamma
    lr_milestones: list[int] = dataclasses.field(default_factory=list)
    lr_gamma: float = 0.1
    lpips_backbone: str | None = None
    #: images per logged sample grid
    sample_count: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.frames_per_clip <= 7:
            raise ValueError(f"frames_per_clip must be in 1..7, got {self.frames_per_clip}")
        if self.step_offset < 0:
            raise ValueError(f"step_offset must be >= 0, got {self.step_offset}")
        if self.crop % self.model.stride:
            raise ValueError(
                f"crop {self.crop} must be a multiple of the HiFiC stride {self.model.stride}"
            )
        self._lpips_trunk: dict[str, Tensor] | None = None
        self._lpips: nn.Module | None = None

    # -- set-up ---------------------------------------------------------------------------

    def generator_optimizers(self, models: PhaseModels) -> PhaseOptimizers:
        """G's and the aux optimizer, with G's step-decay schedule: milestones already passed
        in an earlier phase (``step_offset``) lower the starting rate, later ones are shifted
        to this phase's own step count."""
        passed = sum(m <= self.step_offset for m in self.lr_milestones)
        lr = self.lr * self.lr_gamma**passed
        net, aux = compressai_optimizers(models.generator, lr, self.aux_lr)
        ahead = sorted(m - self.step_offset for m in self.lr_milestones if m > self.step_offset)
        schedule = torch.optim.lr_scheduler.MultiStepLR(net, milestones=ahead, gamma=self.lr_gamma)
        return PhaseOptimizers(net, aux, schedulers={"generator": schedule})

    def build_optimizers(self, models: PhaseModels) -> PhaseOptimizers:
        return self.generator_optimizers(models)

    @property
    def uses_lpips(self) -> bool:
        return self.loss.k_p > 0

    def load_lpips(self) -> None:
        """Read and check the LPIPS trunk on the driver (before Ray starts); it travels to
        the workers with the pickled phase. A no-op when ``k_p`` is 0."""
        if self.uses_lpips:
            self._lpips_trunk = load_lpips_trunk(self.lpips_backbone, LPIPS_PARAM)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_lpips"] = None  # rebuilt by setup() on each worker
        return state

    def setup(self, device: torch.device) -> None:
        if not self.uses_lpips:
            return
        if self._lpips_trunk is None:
            self._lpips_trunk = load_lpips_trunk(self.lpips_backbone, LPIPS_PARAM)
        self._lpips = build_lpips(self._lpips_trunk).to(device)

    def build_models(self) -> PhaseModels:
        return PhaseModels(HiFiC(self.model))

    # -- one iteration --------------------------------------------------------------------

    def _lpips_distance(self, x_hat: Tensor, x: Tensor) -> Tensor:
        assert self._lpips is not None, "setup() builds LPIPS"
        return self._lpips(x_hat, x, normalize=True)

    def generator_loss(
        self, models: PhaseModels, batch: Tensor, outputs: dict[str, Any], step: int
    ) -> dict[str, Tensor]:
        fake_logits = None
        if models.discriminator is not None:
            fake_logits = models.discriminator(outputs["x_hat"], outputs["y_hat"])
        if self.uses_lpips and self._lpips is None:
            raise RunnerError(f"phase {self.name!r}: LPIPS is not set up (call setup())")
        terms = hific_generator_loss(
            outputs,
            outputs["x"],
            self.loss,
            lpips_fn=self._lpips_distance if self.uses_lpips else None,
            fake_logits=fake_logits,
            step=step + self.step_offset,
        )
        keys = list(_LOGGED_TERMS)
        if self.uses_lpips:
            keys += ["lpips", "weighted_lpips"]
        if fake_logits is not None:
            keys += ["gan", "weighted_gan"]
        device = outputs["x"].device
        out = {k: terms[k].to(device) for k in keys}
        out["psnr"] = 10 * torch.log10(255.0**2 / out["mse"].detach().clamp_min(1e-10))
        return out

    # -- logging and export ---------------------------------------------------------------

    def sample_images(self, models: PhaseModels, batch: Tensor) -> dict[str, np.ndarray]:
        x = batch[: self.sample_count]
        x_hat = models.generator(x)["x_hat"].clamp(0, 1)
        return {"reconstruction": image_grid(x, x_hat, max_items=self.sample_count)}

    def export(self, models: PhaseModels, export_dir: Path) -> None:
        meta = {
            "phase": self.name,
            "loss": self.loss.to_dict(),
            "lpips_backbone": self.lpips_backbone,
        }
        save_hific(export_dir / "hific.pt", models.generator, meta)
        if models.discriminator is not None:
            torch.save(models.discriminator.state_dict(), export_dir / "discriminator.pt")

    def read_init_weights(self, path: Path) -> dict[str, dict[str, Tensor]]:
        """A previous export: a folder with ``hific.pt`` (and maybe ``discriminator.pt``),
        or a ``hific.pt`` file. Its HiFiC config must be this phase's."""
        path = Path(path)
        file = path / "hific.pt" if path.is_dir() else path
        try:
            model, _ = load_hific(file)
        except WeightsError as exc:
            raise RunnerError(f"init weights: {exc}") from exc
        if model.config != self.model:
            raise RunnerError(
                f"init weights {file}: HiFiC config {model.config} differs from this "
                f"phase's {self.model} (hific.preset)"
            )
        state = {"generator": model.state_dict()}
        disc = file.parent / "discriminator.pt"
        if disc.is_file() and isinstance(self, HiFiCGANPhase):
            state["discriminator"] = torch.load(disc, map_location="cpu", weights_only=True)
        return state


@dataclasses.dataclass
class HiFiCGANPhase(HiFiCWarmupPhase):
    """HiFiC's adversarial phase: the warm-up loss + β·(−log D(x̂, ŷ)), with D(x, ŷ) trained
    by the non-saturating loss, one D step then one G step per iteration."""

    name: ClassVar[str] = "hific_gan"

    lr_d: float = 1e-4

    def build_models(self) -> PhaseModels:
        return PhaseModels(HiFiC(self.model), HiFiCDiscriminator.from_config(self.model))

    def build_optimizers(self, models: PhaseModels) -> PhaseOptimizers:
        optimizers = self.generator_optimizers(models)
        assert models.discriminator is not None
        optimizers.discriminator = torch.optim.Adam(models.discriminator.parameters(), lr=self.lr_d)
        return optimizers

    def discriminator_loss(
        self, models: PhaseModels, batch: Tensor, outputs: dict[str, Any], step: int
    ) -> dict[str, Tensor]:
        assert models.discriminator is not None
        x, fake = outputs["x"], outputs["x_hat"].detach()
        y_hat = outputs["y_hat"].detach()
        # real and fake in one batch, both conditioned on the same latent (HiFiC's D)
        logits = models.discriminator(torch.cat([x, fake]), torch.cat([y_hat, y_hat]))
        real_logits, fake_logits = logits.chunk(2)
        terms = discriminator_loss(real_logits, fake_logits)
        return {
            "loss": terms["loss"],
            "real_loss": terms["real"],
            "fake_loss": terms["fake"],
            "real_prob": terms["d_real"],
            "fake_prob": terms["d_fake"],
        }


def hific_phases(params: Params, quality: str) -> tuple[HiFiCWarmupPhase, HiFiCGANPhase | None]:
    """The warm-up phase and (unless ``hific.gan_steps`` is 0) the GAN phase of one quality,
    from ``params.hific``."""
    cfg = params.hific
    point = cfg.operating_points.get(quality)  # type: ignore[call-overload]
    if point is None:
        raise ConfigError(f"hific.operating_points has no entry for quality {quality!r}")
    try:
        loss = HiFiCLossWeights(
            target_bpp=point.target_bpp,
            lambda_a=point.lambda_a,
            lambda_b=point.lambda_b,
            k_m=point.k_m,
            k_p=point.k_p,
            beta=point.beta,
        )
    except ValueError as exc:
        raise ConfigError(f"hific.operating_points.{quality}: {exc}") from exc
    common: dict[str, Any] = {
        "model": HiFiCConfig.preset(cfg.preset),
        "loss": loss,
        "lr": cfg.lr,
        "aux_lr": cfg.aux_lr,
        "lr_milestones": list(cfg.lr_milestones),
        "lr_gamma": cfg.lr_gamma,
        "batch_size": cfg.batch_size,
        "crop": cfg.crop,
        "random_flip": params.data.random_flip,
        "lpips_backbone": str(cfg.lpips_backbone) if cfg.lpips_backbone else None,
        "sample_count": max(1, min(params.tracking.max_logged_images, cfg.batch_size)),
    }
    warmup = HiFiCWarmupPhase(**common)
    gan = (
        HiFiCGANPhase(
            **common,
            lr_d=cfg.lr_d,
            step_offset=cfg.warmup_steps if cfg.gan_schedules == "continue" else 0,
        )
        if cfg.gan_steps > 0
        else None
    )
    return warmup, gan
