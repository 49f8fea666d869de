"""PLVC's three training phases (paper "Training strategies", eqs. 4-6, Table 1) as
:class:`~pipeline.train.phase.TrainingPhase` s for :func:`~pipeline.train.runner.run_phase`.

- :class:`SinglePPhase`, eq. 4: ``R(y_1) + λ·MSE(x̂_1, x_1)`` on the first P-frame, the
  reference being the HiFiC-decoded I-frame. The official code's warm-up comes first
  (``flow_steps``: flow network and motion auto-encoder on the warped frame, ``mc_steps``:
  + motion compensation), then the whole model.
- :class:`MultiPPhase`, eq. 5: ``Σ_i R(y_i) + λ·MSE(x̂_i, x_i)`` over ``num_pframes``
  consecutive P-frames; states and reconstructed references are carried through the clip
  without detaching, so gradients flow back through the recurrence.
- :class:`GanPhase`, eq. 6: one step of the recurrent conditional discriminator, then one
  generator step with Table 1's α1/α2 (switched at R_T), λ' and β; the paper's ablations
  ("w/o GAN", "w/o h^D", "w/o h^D, w/o m_i") and the official loss (+ LPIPS, rate summed
  over the clip) are switches.

Batches are rows of :func:`pipeline.data.training_clips.read_training_clips`: ``frames``
(the original
im1..imN) and ``iframe`` (the decoded im1, same crop). Every phase logs each loss term per
frame position (keys ``<term>/p<i>``), bpp per frame and, for the GAN phase, the share of
frames where α1 was active and D's mean output on real and fake; sample images show
reconstructions next to originals and a temporal profile (one pixel row stacked over
time, as the paper's Figs. 1 and 6) in which flicker shows.

Exports: ``generator.pt`` in :mod:`plvc.weights`' format (what ``plvc`` encodes and decodes
with) and, for the GAN phase, ``discriminator.pt`` (:data:`DISCRIMINATOR_FORMAT`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.backbones import (
    MissingWeightsError,
    build_lpips,
    load_flow_weights,
    load_lpips_trunk,
)
from pipeline.config import Params
from pipeline.images import image_grid
from pipeline.train.phase import (
    DataError,
    PhaseModels,
    PhaseOptimizers,
    RunnerError,
    TrainingPhase,
    compressai_optimizers,
)
from pipeline.train.phases.plvc_models import (
    DISCRIMINATOR_FORMAT,
    WARMUP_STAGES,
    ClipBatch,
    ClipDiscriminator,
    ClipGenerator,
    clip_temporal_profiles,
    discriminator_config,
    model_config,
    per_frame_scalars,
    rpm_parameters,
)
from plvc.discriminator import DiscriminatorConfig
from plvc.errors import WeightsError
from plvc.flow import PyramidFlow
from plvc.generator import PLVC, PLVCConfig
from plvc.losses import (
    GeneratorLossOptions,
    discriminator_loss,
    frame_rates,
    generator_loss,
    multi_p_loss,
    psnr_from_mse,
)

__all__ = [
    "LPIPS_PARAM",
    "PHASE_STAGES",
    "GanPhase",
    "MultiPPhase",
    "PLVCPhase",
    "SinglePPhase",
    "build_phase",
]


#: the param naming the AlexNet weights of the official GAN loss's LPIPS term
LPIPS_PARAM = "train.gan.lpips_backbone"
FLOW_PARAM = "train.single_p.flow_weights"


#: phase name -> (stage, params section, previous phase whose export it starts from)
PHASE_STAGES: dict[str, tuple[str, str, str | None]] = {
    "single_p": ("train_single_p", "single_p", None),
    "multi_p": ("train_multi_p", "multi_p", "single_p"),
    "gan": ("train_gan", "gan", "multi_p"),
}


def _column(rows: Mapping[str, np.ndarray], key: str, name: str, ndim: int) -> np.ndarray:
    value = rows.get(key)
    if not isinstance(value, np.ndarray) or not (value.ndim == ndim or value.dtype == object):
        shape = None if value is None else getattr(value, "shape", type(value).__name__)
        raise DataError(
            f"phase {name!r}: batch column {key!r} must be uint8 with {ndim} dims "
            f"(rows of pipeline.data.training_clips.read_training_clips), got {shape}"
        )
    return value


@dataclasses.dataclass
class PLVCPhase(TrainingPhase):
    """What the three phases share: the generator, its optimizers and LR schedule, batches
    of clips with their decoded I-frames, per-frame logging, samples and export.

    Fields are the settings compared when a run resumes (``config()``).
    """

    name: ClassVar[str] = "plvc"

    quality: str = "low"
    #: λ of eqs. 4-5 (Table 1)
    lmbda: float = 256.0
    #: PLVCConfig.to_dict()
    model: dict[str, Any] = dataclasses.field(default_factory=lambda: PLVCConfig.tiny().to_dict())
    lr: float = 1e-4
    aux_lr: float = 1e-3
    #: the factorized priors' learning rate (None: lr); see compressai_optimizers
    prior_lr: float | None = None
    batch_size: int = 4
    #: square training crop, drawn per clip and step (same window for all its frames)
    crop: int = 256
    random_flip: bool = True
    lr_milestones: list[int] = dataclasses.field(default_factory=list)
    lr_gamma: float = 0.1
    num_pframes: int = 1
    #: rows in Ray Data's local shuffle buffer (each worker); 0 streams in shard order
    shuffle_buffer_rows: int = 64
    #: the intra codec the I-frames were coded with (written into the exported weights)
    intra_name: str = "hific"
    intra_config: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        stride = PLVC.stride
        if self.crop % stride:
            raise RunnerError(
                f"phase {self.name!r}: crop {self.crop} is not a multiple of {stride} "
                f"(the codec's stride): set train.{self.name}.crop to one"
            )
        if not 1 <= self.num_pframes <= 6:
            raise RunnerError(
                f"phase {self.name!r}: num_pframes must be 1..6, got {self.num_pframes}"
            )

    # -- building ------------------------------------------------------------------------

    @property
    def plvc_config(self) -> PLVCConfig:
        return PLVCConfig.from_dict(self.model)

    @property
    def clip_frames(self) -> int:
        """Frames per training clip: the I-frame and ``num_pframes`` P-frames."""
        return 1 + self.num_pframes

    def _generator(self) -> ClipGenerator:
        generator = ClipGenerator(self.plvc_config)
        if self.num_pframes == 1:
            # eq. 4 codes only the first P-frame (factorized prior): the RPMs get no
            # gradient, and frozen weights keep DDP from waiting for one
            for p in rpm_parameters(generator.plvc):
                p.requires_grad_(False)
        return generator

    def build_models(self) -> PhaseModels:
        return PhaseModels(self._generator())

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(self.lr_milestones), gamma=self.lr_gamma
        )

    def build_optimizers(self, models: PhaseModels) -> PhaseOptimizers:
        net, aux = compressai_optimizers(
            models.generator, self.lr, self.aux_lr, prior_lr=self.prior_lr
        )
        return PhaseOptimizers(net, aux, schedulers={"generator": self._scheduler(net)})

    # -- data ----------------------------------------------------------------------------

    def prepare_batch(self, rows: Mapping[str, np.ndarray], device: torch.device) -> ClipBatch:
        """Rows of whole clips (``frames`` [B, T, H, W, 3], ``iframe`` [B, H, W, 3], uint8;
        or per-clip arrays of several sizes) -> a fresh random ``crop`` window (and flip)
        per clip, the same for its frames and its I-frame, drawn from the worker's torch
        RNG (seeded per rank, restored on resume): every epoch sees new crops."""
        from pipeline.data.clips import batch_to_tensor

        frames = _column(rows, "frames", self.name, 5)
        iframes = _column(rows, "iframe", self.name, 4)
        if len(frames) != len(iframes):
            raise DataError(f"phase {self.name!r}: {len(frames)} clips but {len(iframes)} I-frames")
        crop, t = self.crop, self.clip_frames
        clips, refs = [], []
        for clip, iframe in zip(frames, iframes, strict=True):
            if clip.ndim != 4 or clip.shape[-1] != 3 or clip.dtype != np.uint8:
                raise DataError(
                    f"phase {self.name!r}: a clip must be uint8 [T, H, W, 3], got "
                    f"{clip.dtype} {clip.shape}"
                )
            if clip.shape[0] < t:
                raise DataError(
                    f"phase {self.name!r} needs clips of {t} frames, got {clip.shape[0]}: "
                    f"read them with num_frames={t}"
                )
            if iframe.shape != clip.shape[1:]:
                raise DataError(
                    f"phase {self.name!r}: I-frame {iframe.shape} does not match the frames "
                    f"{clip.shape[1:]}"
                )
            height, width = clip.shape[1:3]
            if height < crop or width < crop:
                raise DataError(
                    f"phase {self.name!r}: frames of {width}x{height} are smaller than the "
                    f"{crop}x{crop} crop (train.{self.name}.crop)"
                )
            top = int(torch.randint(0, height - crop + 1, ()))
            left = int(torch.randint(0, width - crop + 1, ()))
            window = (slice(top, top + crop), slice(left, left + crop))
            clip, iframe = clip[:t, window[0], window[1]], iframe[window]
            if self.random_flip and bool(torch.rand(()) < 0.5):
                clip, iframe = clip[:, :, ::-1], iframe[:, ::-1]
            clips.append(clip)
            refs.append(iframe)
        return ClipBatch(
            batch_to_tensor(np.stack(clips), device, non_blocking=True),
            batch_to_tensor(np.stack(refs), device, non_blocking=True),
        )

    # -- images --------------------------------------------------------------------------

    def sample_images(self, models: PhaseModels, batch: ClipBatch) -> dict[str, np.ndarray]:
        """Clip 0 of the batch coded in eval mode (rounded latents): originals over
        reconstructions per P-frame, and temporal profiles (original over decoded, the
        I-frame first)."""
        plvc = models.generator.plvc
        frames, iframe = batch.frames[:1].float(), batch.iframe[:1].float()
        x_hat = plvc(frames, iframe)["x_hat"][0].float().clamp(0, 1)
        originals = frames[0, 1:]
        return {
            "reconstruction": image_grid(originals, x_hat, max_items=x_hat.shape[0]),
            "temporal_profile": clip_temporal_profiles(
                torch.cat([frames[0, :1], originals]), torch.cat([iframe, x_hat])
            ),
        }

    # -- weights -------------------------------------------------------------------------

    def _export_extra(self) -> dict[str, Any]:
        return {"phase": self.name, "lmbda": float(self.lmbda), "num_pframes": self.num_pframes}

    def export(self, models: PhaseModels, export_dir: Path) -> None:
        from plvc.weights import save_weights

        save_weights(
            export_dir / "generator.pt",
            models.generator.plvc,
            intra_name=self.intra_name,
            intra_config=self.intra_config,
            quality=self.quality,
            extra=self._export_extra(),
        )

    def read_init_weights(self, path: Path) -> dict[str, dict[str, Tensor]]:
        from plvc.errors import WeightsError
        from plvc.weights import load_weights

        file = Path(path) / "generator.pt"
        if not file.is_file():
            raise RunnerError(
                f"init weights {path}: no generator.pt there; run the previous phase's stage "
                "first (train_single_p before train_multi_p before train_gan)"
            )
        try:
            model, meta = load_weights(file)
        except WeightsError as exc:
            raise RunnerError(f"init weights {file}: {exc}") from exc
        if meta.config != self.plvc_config:
            raise RunnerError(
                f"init weights {file} were trained with model config {meta.config.to_dict()}, "
                f"but train.model gives {self.model}: re-run the earlier phases with this model"
            )
        return {"generator": model.state_dict()}

    def apply_init_weights(self, models: PhaseModels, state: Mapping[str, Any]) -> None:
        models.generator.plvc.load_state_dict(state["generator"])
        if models.discriminator is not None and "discriminator" in state:
            models.discriminator.d.load_state_dict(state["discriminator"])

    # -- shared loss pieces ----------------------------------------------------------------

    def _clip_out(self, models: PhaseModels, batch: ClipBatch) -> dict[str, Any]:
        return models.generator(batch.frames, batch.iframe, mode="clip")


@dataclasses.dataclass
class SinglePPhase(PLVCPhase):
    """Eq. 4 on the first P-frame, after the official code's warm-up sub-phases.

    Steps ``1..flow_steps``: ``R(y^m_1) + λ·(MSE(warp(x̂_0, m̂_1), x_1) + L_flow)``, with
    ``L_flow`` the flow network's self-supervised pyramid loss (:func:`flow_warp_loss`):
    only the flow network and the motion auto-encoder/entropy model get gradients.
    Next ``mc_steps``: ``R(y^m_1) + λ·MSE(x_mc, x_1)``, adding motion compensation. Then
    the whole model on eq. 4. Which sub-phase a step is in follows from the step number
    alone, so a resumed run continues in the right one; ``warmup/<stage>`` terms (0/1)
    log it.
    """

    name: ClassVar[str] = "single_p"

    flow_steps: int = 0
    mc_steps: int = 0
    #: a pretrained SpyNet to start the flow network from (None: from scratch)
    flow_weights: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_pframes != 1:
            raise RunnerError("the single-P phase codes exactly one P-frame (num_pframes=1)")
        if self.flow_steps < 0 or self.mc_steps < 0:
            raise RunnerError("train.single_p.flow_steps and mc_steps must be >= 0")
        self._flow_state: dict[str, Tensor] | None = None
        if self.flow_weights is not None:
            # converted and checked here, on the driver; the weights travel with the
            # pickled phase, so workers on other nodes need not see the file
            cfg = self.plvc_config
            flow = PyramidFlow(cfg.flow_levels, cfg.flow_widths, cfg.flow_kernel)
            try:
                flow.load_spynet(load_flow_weights(self.flow_weights, FLOW_PARAM))
            except MissingWeightsError as exc:
                raise RunnerError(str(exc)) from None
            except WeightsError as exc:
                raise RunnerError(
                    f"{FLOW_PARAM} = {self.flow_weights!r}: {exc}. SpyNet's sizes are "
                    "train.model 'paper''s flow network"
                ) from None
            self._flow_state = flow.state_dict()

    @property
    def find_unused_parameters(self) -> bool:  # type: ignore[override]
        # warm-up sub-phases leave MC / residual weights without gradients
        return self.flow_steps + self.mc_steps > 0

    def build_models(self) -> PhaseModels:
        generator = self._generator()
        if self._flow_state is not None:
            # a fresh start only matters: on resume the checkpoint overwrites these
            generator.plvc.motion_estimation.load_state_dict(self._flow_state)
        return PhaseModels(generator)

    def warmup_stage(self, step: int) -> str:
        """The sub-phase of (1-based) ``step``: ``"flow"``, ``"mc"`` or ``"full"``."""
        if step <= self.flow_steps:
            return "flow"
        if step <= self.flow_steps + self.mc_steps:
            return "mc"
        return "full"

    def forward(self, models: PhaseModels, batch: ClipBatch, step: int) -> dict[str, Any]:
        return models.generator(batch.frames, batch.iframe, mode=self.warmup_stage(step))

    def generator_loss(
        self, models: PhaseModels, batch: ClipBatch, outputs: dict[str, Any], step: int
    ) -> dict[str, Tensor]:
        stage = self.warmup_stage(step)
        x = batch.frames[:, 1]
        b, _, h, w = x.shape
        rates = frame_rates(outputs["likelihoods"], b * h * w)
        mse = (outputs["x_hat"][:, 0].float() - x.float()).pow(2).mean()
        warp_mse = (outputs["x_warp"].float() - x.float()).pow(2).mean()
        mc_mse = (outputs["x_mc"].float() - x.float()).pow(2).mean()
        terms: dict[str, Tensor] = {}
        if stage == "flow":
            pyramid = outputs["flow_pyramid"]
            loss = rates["motion"].sum() + self.lmbda * (warp_mse + pyramid["loss"])
            terms["flow_pyramid_mse"] = pyramid["loss"].detach()
        elif stage == "mc":
            loss = rates["motion"].sum() + self.lmbda * mc_mse
        else:
            loss = rates["total"].sum() + self.lmbda * mse
        terms.update(
            loss=loss,
            rate_bpp=rates["total"].sum().detach(),
            rate_bpp_motion=rates["motion"].sum().detach(),
            rate_bpp_residual=rates["residual"].sum().detach(),
            mse=mse.detach(),
            psnr=psnr_from_mse(mse),
            warp_mse=warp_mse.detach(),
            mc_mse=mc_mse.detach(),
        )
        for name in WARMUP_STAGES:
            terms[f"warmup/{name}"] = torch.tensor(float(stage == name), device=x.device)
        return terms

    def _export_extra(self) -> dict[str, Any]:
        return {**super()._export_extra(), "flow_steps": self.flow_steps, "mc_steps": self.mc_steps}


@dataclasses.dataclass
class MultiPPhase(PLVCPhase):
    """Eq. 5 over ``num_pframes`` consecutive P-frames of each clip. The generator's
    states and reconstructions pass from frame to frame undetached (no truncated BPTT):
    the last frame's loss reaches every earlier frame's computation."""

    name: ClassVar[str] = "multi_p"

    num_pframes: int = 6

    def forward(self, models: PhaseModels, batch: ClipBatch, step: int) -> dict[str, Any]:
        return self._clip_out(models, batch)

    def generator_loss(
        self, models: PhaseModels, batch: ClipBatch, outputs: dict[str, Any], step: int
    ) -> dict[str, Tensor]:
        return per_frame_scalars(multi_p_loss(outputs, batch.frames, self.lmbda))


@dataclasses.dataclass
class GanPhase(PLVCPhase):
    """Eq. 6: a D step then a G step per iteration (the runner's GAN half-steps).

    D sees, per P-frame, ``(x_i, x_{i-1})`` and ``(x̂_i, x̂_{i-1})`` (x̂_0 = the decoded
    I-frame) conditioned on the latent ``y_i`` and the estimated flow ``m_i``; its
    recurrent state runs across the clip, real and fake each with their own. The
    conditions are detached (as HiFiC's release does with its latent): D shapes G only
    through the reconstructions. ``adversarial=False`` is the "w/o GAN" ablation (no D,
    eq. 6 without its last term); ``d_hidden_state`` / ``d_motion_condition`` False are
    "w/o h^D" / "w/o m_i". ``loss="official"`` adds LPIPS (weight 1, needs
    ``lpips_backbone``) and switches α on the rate summed over the clip.
    """

    name: ClassVar[str] = "gan"

    num_pframes: int = 6
    lr_d: float = 1e-5
    #: Table 1: R_T (bpp), α1, α2, λ', β
    r_target: float = 0.025
    alpha1: float = 3.0
    alpha2: float = 0.01
    lmbda_gan: float = 100.0
    beta: float = 0.1
    adversarial: bool = True
    #: DiscriminatorConfig.to_dict() (ablation switches applied)
    discriminator: dict[str, Any] = dataclasses.field(
        default_factory=lambda: DiscriminatorConfig.tiny().to_dict()
    )
    loss: str = "paper"
    lpips_backbone: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in ("paper", "official"):
            raise RunnerError(f"train.gan.loss must be 'paper' or 'official', got {self.loss!r}")
        self._lpips_trunk: dict[str, Tensor] | None = None
        if self.loss == "official":
            if self.lpips_backbone is None:
                raise RunnerError(
                    "train.gan.loss 'official' adds an LPIPS(alex) term: set "
                    "train.gan.lpips_backbone to torchvision AlexNet weights (a state dict file)"
                )
            # read and checked here, on the driver; the trunk travels with the pickled
            # phase, so workers on other nodes need not see the file
            try:
                self._lpips_trunk = load_lpips_trunk(self.lpips_backbone, LPIPS_PARAM)
            except MissingWeightsError as exc:
                raise RunnerError(str(exc)) from None
        d_cfg = DiscriminatorConfig.from_dict(self.discriminator)
        if d_cfg.latent_channels != 2 * self.plvc_config.latent_channels:
            raise RunnerError(
                f"the discriminator's condition has {d_cfg.latent_channels} channels but the "
                f"generator's latent y = [y^m, y^r] has {2 * self.plvc_config.latent_channels}"
            )
        self._lpips: nn.Module | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_lpips"] = None  # rebuilt by setup() on each worker
        return state

    @property
    def options(self) -> GeneratorLossOptions:
        """Eq. 6's weights: the paper's, or the official code's (+ LPIPS, clip-summed rate)."""
        official = self.loss == "official"
        return GeneratorLossOptions(
            rate_target=self.r_target,
            alpha1=self.alpha1,
            alpha2=self.alpha2,
            lmbda_prime=self.lmbda_gan,
            beta=self.beta if self.adversarial else 0.0,
            lpips_weight=1.0 if official else 0.0,
            rate_target_mode="clip_sum" if official else "per_frame",
        )

    def build_models(self) -> PhaseModels:
        d = (
            ClipDiscriminator(DiscriminatorConfig.from_dict(self.discriminator))
            if self.adversarial
            else None
        )
        return PhaseModels(self._generator(), d)

    def build_optimizers(self, models: PhaseModels) -> PhaseOptimizers:
        opts = super().build_optimizers(models)
        if models.discriminator is not None:
            opts.discriminator = torch.optim.Adam(models.discriminator.parameters(), lr=self.lr_d)
            opts.schedulers["discriminator"] = self._scheduler(opts.discriminator)
        return opts

    def setup(self, device: torch.device) -> None:
        if self.loss == "official":
            self._lpips = build_lpips(self._lpips_trunk).to(device)

    def _lpips_fn(self) -> Any:
        if self.loss != "official":
            return None
        if self._lpips is None:
            raise RunnerError("the official GAN loss needs setup(device) to build LPIPS first")
        lpips = self._lpips
        return lambda a, b: lpips(a, b, normalize=True)

    def forward(self, models: PhaseModels, batch: ClipBatch, step: int) -> dict[str, Any]:
        return self._clip_out(models, batch)

    @staticmethod
    def _conditions(outputs: Mapping[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        return [f.detach() for f in outputs["flow"]], [y.detach() for y in outputs["y"]]

    def discriminator_loss(
        self, models: PhaseModels, batch: ClipBatch, outputs: dict[str, Any], step: int
    ) -> dict[str, Tensor]:
        assert models.discriminator is not None
        flows, ys = self._conditions(outputs)
        logits = models.discriminator(
            batch.frames, batch.iframe, outputs["x_hat"].detach(), flows, ys
        )
        terms = discriminator_loss(logits["real"], logits["fake"])
        # the runner prefixes D terms with "d_": d_loss, d_real/p1, d_fake, ...
        out = per_frame_scalars(
            {
                "loss": terms["loss"],
                "loss_per_frame": terms["loss_per_frame"],
                "real_term_per_frame": terms["real_term_per_frame"],
                "fake_term_per_frame": terms["fake_term_per_frame"],
                "real_per_frame": terms["d_real"],
                "fake_per_frame": terms["d_fake"],
            }
        )
        out["real"] = terms["d_real"].mean()
        out["fake"] = terms["d_fake"].mean()
        return out

    def generator_loss(
        self, models: PhaseModels, batch: ClipBatch, outputs: dict[str, Any], step: int
    ) -> dict[str, Tensor]:
        num_p = outputs["x_hat"].shape[1]
        if models.discriminator is not None:
            flows, ys = self._conditions(outputs)
            fake = models.discriminator(
                batch.frames, batch.iframe, outputs["x_hat"], flows, ys, fake_only=True
            )["fake"]
        else:
            # "w/o GAN": β = 0 in self.options, the logits only fill the signature
            fake = [outputs["x_hat"].new_zeros(()) for _ in range(num_p)]
        terms = generator_loss(outputs, batch.frames, fake, self.options, self._lpips_fn())
        if models.discriminator is None:
            terms.pop("adversarial_term")
            terms.pop("adversarial_per_frame")
        else:
            terms["d_fake_in_g_step"] = torch.stack(
                [torch.sigmoid(f.detach().float()).mean() for f in fake]
            ).mean()
        return per_frame_scalars(terms)

    def export(self, models: PhaseModels, export_dir: Path) -> None:
        super().export(models, export_dir)
        if models.discriminator is not None:
            d = models.discriminator.d
            torch.save(
                {
                    "format": DISCRIMINATOR_FORMAT,
                    "version": 1,
                    "config": d.config.to_dict(),
                    "state_dict": {k: v.detach().cpu() for k, v in d.state_dict().items()},
                },
                export_dir / "discriminator.pt",
            )

    def _export_extra(self) -> dict[str, Any]:
        return {
            **super()._export_extra(),
            "r_target": self.r_target,
            "alpha1": self.alpha1,
            "alpha2": self.alpha2,
            "lmbda_gan": self.lmbda_gan,
            "beta": self.beta,
            "adversarial": self.adversarial,
            "loss": self.loss,
        }


def build_phase(
    phase: str,
    params: Params,
    quality: str,
    *,
    intra_name: str = "hific",
    intra_config: Mapping[str, Any] | None = None,
) -> PLVCPhase:
    """The phase ``"single_p"``, ``"multi_p"`` or ``"gan"`` for ``quality`` from ``params``
    (``train.<phase>``, ``train.model``/``discriminator``, ``qualities.<quality>``)."""
    if phase not in PHASE_STAGES:
        raise RunnerError(f"unknown PLVC phase {phase!r}; one of {sorted(PHASE_STAGES)}")
    if quality not in params.qualities:
        raise RunnerError(
            f"quality {quality!r} is not in params 'qualities' ({sorted(params.qualities)})"
        )
    table1 = params.qualities[quality]  # type: ignore[index]
    gen_cfg = model_config(params.train.model)
    section = getattr(params.train, PHASE_STAGES[phase][1])
    common: dict[str, Any] = {
        "quality": quality,
        "lmbda": float(table1.lmbda),
        "model": gen_cfg.to_dict(),
        "lr": section.lr,
        "aux_lr": section.aux_lr,
        "prior_lr": section.prior_lr,
        "batch_size": section.batch_size,
        "crop": section.crop,
        "random_flip": params.data.random_flip,
        "lr_milestones": list(section.lr_milestones),
        "lr_gamma": section.lr_gamma,
        "intra_name": intra_name,
        "intra_config": dict(intra_config or {}),
    }
    if phase == "single_p":
        cfg = params.train.single_p
        if cfg.flow_steps + cfg.mc_steps >= cfg.steps:
            raise RunnerError(
                f"train.single_p.flow_steps + mc_steps ({cfg.flow_steps} + {cfg.mc_steps}) must "
                f"be below train.single_p.steps ({cfg.steps}): eq. 4 itself needs steps"
            )
        return SinglePPhase(
            **common,
            num_pframes=1,
            flow_steps=cfg.flow_steps,
            mc_steps=cfg.mc_steps,
            flow_weights=str(cfg.flow_weights) if cfg.flow_weights is not None else None,
        )
    if phase == "multi_p":
        return MultiPPhase(**common, num_pframes=params.train.multi_p.num_pframes)
    gan = params.train.gan
    return GanPhase(
        **common,
        num_pframes=gan.num_pframes,
        lr_d=gan.lr_d,
        r_target=float(table1.r_target),
        alpha1=float(table1.alpha1),
        alpha2=float(table1.alpha2),
        lmbda_gan=float(table1.lmbda_gan),
        beta=float(table1.beta),
        adversarial=gan.adversarial,
        discriminator=discriminator_config(
            params.train.discriminator,
            gen_cfg,
            hidden_state=gan.d_hidden_state,
            motion_condition=gan.d_motion_condition,
        ).to_dict(),
        loss=gan.loss,
        lpips_backbone=str(gan.lpips_backbone) if gan.lpips_backbone is not None else None,
    )
