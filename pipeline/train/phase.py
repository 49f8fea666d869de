"""What a training phase is: the interface a phase implements (:class:`TrainingPhase`), its
models and optimizers, and the errors a run raises. The runner (:mod:`pipeline.train.runner`)
owns everything else.
"""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from pipeline.errors import PipelineError

__all__ = [
    "DataError",
    "FatalError",
    "NoFullBatchError",
    "NonFiniteLossError",
    "PhaseModels",
    "PhaseOptimizers",
    "RunnerError",
    "TrainingPhase",
    "TrainingRunError",
    "compressai_optimizers",
    "unwrap",
]


class RunnerError(PipelineError):
    """A training phase cannot run as configured."""


class TrainingRunError(RunnerError):
    """The Ray Train run failed (after its allowed restarts)."""


class FatalError(RunnerError):
    """Raised alike on every rank; retrying from a checkpoint cannot help."""


class NonFiniteLossError(FatalError):
    """A loss term or a gradient became NaN or infinite."""


class DataError(RunnerError):
    """The training data cannot feed the phase (bad batch layout, too few clips)."""


class NoFullBatchError(DataError, FatalError):
    """Every worker's share of the data is smaller than one batch (alike on all ranks)."""


@dataclasses.dataclass
class PhaseModels:
    """The trainable networks of a phase. In the train loop these are DDP-wrapped when
    there is more than one worker; call them, don't reach into their attributes."""

    generator: nn.Module
    discriminator: nn.Module | None = None

    def named(self) -> dict[str, nn.Module]:
        out = {"generator": self.generator}
        if self.discriminator is not None:
            out["discriminator"] = self.discriminator
        return out


@dataclasses.dataclass
class PhaseOptimizers:
    """Optimizers over disjoint parameter sets, plus LR schedulers stepped once per iteration.

    ``aux`` optimizes only the entropy bottlenecks' ``quantiles`` with the generator's
    ``aux_loss()`` (CompressAI's convention); ``generator`` must not hold them.
    """

    generator: Optimizer
    aux: Optimizer | None = None
    discriminator: Optimizer | None = None
    schedulers: dict[str, LRScheduler] = dataclasses.field(default_factory=dict)

    def named(self) -> dict[str, Optimizer]:
        out = {"generator": self.generator}
        if self.aux is not None:
            out["aux"] = self.aux
        if self.discriminator is not None:
            out["discriminator"] = self.discriminator
        return out


def compressai_optimizers(
    model: nn.Module, lr: float, aux_lr: float = 1e-3, prior_lr: float | None = None
) -> tuple[Optimizer, Optimizer | None]:
    """Adam over the network's parameters and Adam over its ``*.quantiles`` (None if it has
    none), the split of CompressAI's ``net_aux`` optimizer.

    ``prior_lr`` (None: ``lr``) is the learning rate of the factorized priors' densities
    (the ``EntropyBottleneck`` matrices, biases and factors), in a second parameter group.
    Adam moves each parameter by about ``lr`` per step whatever its gradient, and those
    densities start wide (``init_scale`` 10): at ``lr`` 5e-4 they need thousands of steps
    to fit latents that are near zero from the first step, and until then every latent
    is charged ~1.3 bits. Short runs (the sample) give them a larger rate of their own.
    """
    from compressai.entropy_models import EntropyBottleneck

    prior_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, EntropyBottleneck)
        for n, p in m.named_parameters()
        if n != "quantiles"
    }
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    quantiles = [p for n, p in named if n.endswith(".quantiles")]
    net = [p for n, p in named if not n.endswith(".quantiles")]
    groups: list[dict[str, object]] = [{"params": net}]
    if prior_lr is not None and prior_lr != lr:
        groups = [
            {"params": [p for p in net if id(p) not in prior_ids]},
            {"params": [p for p in net if id(p) in prior_ids], "lr": prior_lr},
        ]
    return torch.optim.Adam(groups, lr=lr), (
        torch.optim.Adam(quantiles, lr=aux_lr) if quantiles else None
    )


class TrainingPhase(ABC):
    """What a training stage implements; :func:`run_phase` owns the rest.

    The object is pickled to every Ray worker, so keep it a small, picklable description
    (a dataclass of settings is ideal) and build networks in :meth:`build_models`.

    Per iteration the runner calls :meth:`forward` once, then (GAN phases)
    :meth:`discriminator_loss` followed by a D optimizer step, then
    :meth:`generator_loss` followed by a G (and aux) optimizer step. Loss methods return
    ``{"loss": <scalar to minimise>, <other scalar terms to log, e.g. "bpp", "mse">}``.
    Everything runs under bf16 autocast on GPU; keep rate terms in float32 inside the model
    if they need it.

    A minimal phase (a dataclass: its fields are the settings compared on resume)::

        @dataclasses.dataclass
        class SinglePPhase(TrainingPhase):
            name: ClassVar[str] = "single_p"      # ClassVar: not a dataclass field
            lmbda: float = 256.0
            batch_size: int = 4

            def build_models(self):
                return PhaseModels(PFrameCodec())
            def build_optimizers(self, models):
                net, aux = compressai_optimizers(models.generator, lr=1e-4)
                return PhaseOptimizers(net, aux)
            def forward(self, models, batch, step):
                return models.generator(batch[:, 1], batch[:, 0])
            def generator_loss(self, models, batch, out, step):
                mse = F.mse_loss(out["x_hat"], batch[:, 1])
                bpp = rate(out["likelihoods"], batch[:, 1])
                return {"loss": bpp + self.lmbda * mse, "mse": mse, "bpp": bpp}
    """

    #: phase name stored in checkpoints (resuming another phase's run is refused)
    name: ClassVar[str] = "phase"
    #: clips per optimizer step over all workers (the global batch, as in the paper); each
    #: of the N data-parallel workers takes ``batch_size / N`` (the runner checks it divides)
    batch_size: int = 4
    #: rows buffered for Ray Data's local shuffle (0: stream in order)
    shuffle_buffer_rows: int = 0
    #: DDP's find_unused_parameters (needed when some parameters get no gradient)
    find_unused_parameters: bool = False

    @abstractmethod
    def build_models(self) -> PhaseModels:
        """Fresh networks on the CPU; the runner moves them to the worker's device."""

    @abstractmethod
    def build_optimizers(self, models: PhaseModels) -> PhaseOptimizers:
        """Optimizers (and schedulers) over ``models``' parameters (already on the device)."""

    @abstractmethod
    def forward(self, models: PhaseModels, batch: Any, step: int) -> Any:
        """Run the generator on a batch (with autograd). Its whole computation for the step
        must go through one call of ``models.generator(...)``, so DDP syncs it once."""

    @abstractmethod
    def generator_loss(
        self, models: PhaseModels, batch: Any, outputs: Any, step: int
    ) -> dict[str, Tensor]:
        """Generator terms; GAN phases call ``models.discriminator`` on the fakes here
        (the runner freezes D for this step)."""

    def discriminator_loss(
        self, models: PhaseModels, batch: Any, outputs: Any, step: int
    ) -> dict[str, Tensor]:
        """D terms for GAN phases. Detach the generator's outputs, and pass real and fake
        through D in one batch (:func:`torch.cat`) so its statistics see both."""
        raise NotImplementedError(
            f"phase {self.name!r} has a discriminator but no discriminator_loss"
        )

    def setup(self, device: torch.device) -> None:  # noqa: B027 - optional hook
        """Build frozen helpers (e.g. LPIPS) on ``device``; called once per worker."""

    def prepare_batch(self, rows: Mapping[str, np.ndarray], device: torch.device) -> Any:
        """A Ray Data numpy batch → model input. Default: ``frames`` uint8 [B, T, H, W, 3]
        → float32 [B, T, 3, H, W] in [0, 1] on ``device``."""
        from pipeline.data.clips import batch_to_tensor

        frames = rows.get("frames")
        if frames is None or frames.ndim != 5:
            shape = None if frames is None else frames.shape
            raise DataError(f"phase {self.name!r}: expected 'frames' [B, T, H, W, 3], got {shape}")
        try:
            return batch_to_tensor(frames, device, non_blocking=True)
        except ValueError as exc:
            raise DataError(f"phase {self.name!r}: batch column 'frames': {exc}") from exc

    def sample_images(self, models: PhaseModels, batch: Any) -> dict[str, np.ndarray]:
        """Images to log (uint8 [H, W, 3], e.g. :func:`image_grid` of originals and
        reconstructions). Called on rank 0 with unwrapped models in eval mode, no grad."""
        return {}

    def export(self, models: PhaseModels, export_dir: Path) -> None:
        """Write the final weights into ``export_dir`` (an empty temp folder the runner
        renames into place). Default: ``<name>.pt`` state dicts per model."""
        for name, module in models.named().items():
            torch.save(module.state_dict(), export_dir / f"{name}.pt")

    def read_init_weights(self, path: Path) -> dict[str, dict[str, Tensor]]:
        """Read a previous phase's export (on the driver). Default: the state dicts of
        :meth:`export`'s files found in ``path``; ``generator.pt`` is required."""
        if not (path / "generator.pt").is_file():
            raise RunnerError(f"init weights {path}: no generator.pt in that folder")
        state = {}
        for name in ("generator", "discriminator"):
            if (path / f"{name}.pt").is_file():
                state[name] = torch.load(path / f"{name}.pt", map_location="cpu", weights_only=True)
        return state

    def apply_init_weights(self, models: PhaseModels, state: Mapping[str, Any]) -> None:
        """Load :meth:`read_init_weights`' result into fresh models (strict)."""
        for name, module in models.named().items():
            if name in state:
                module.load_state_dict(state[name])

    def config(self) -> dict[str, Any]:
        """The settings that make a checkpoint of this phase resumable (compared on resume).
        Default: the dataclass fields."""
        if dataclasses.is_dataclass(self):
            return json.loads(json.dumps(dataclasses.asdict(self), default=_jsonable))
        return {}


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):  # pydantic settings, e.g. a QualityConfig
        return value.model_dump(mode="json")
    return str(value)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or the module itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
