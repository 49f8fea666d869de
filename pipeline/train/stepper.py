"""One training iteration of a phase (:class:`PhaseStepper`), independent of Ray: the D step,
the G step with D frozen, the auxiliary loss, clipping and the NaN/inf check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from pipeline.train.phase import (
    NonFiniteLossError,
    PhaseModels,
    PhaseOptimizers,
    RunnerError,
    TrainingPhase,
    unwrap,
)

__all__ = [
    "PhaseStepper",
]


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """D during the G step: no gradient accumulates in it, and DDP does not sync it."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    no_sync = (
        module.no_sync()
        if isinstance(module, nn.parallel.DistributedDataParallel)
        else contextlib.nullcontext()
    )
    try:
        with no_sync:
            yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _optimizer_params(opt: Optimizer) -> list[Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


class PhaseStepper:
    """One training iteration of a phase on built (possibly DDP-wrapped) models.

    Used by the Ray train loop and usable on its own (tests, debugging a phase in one
    process). In a process group every rank must call the same methods at the same step.
    """

    def __init__(
        self,
        phase: TrainingPhase,
        models: PhaseModels,
        optimizers: PhaseOptimizers,
        *,
        grad_clip: float | None,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.phase = phase
        self.models = models
        self.optimizers = optimizers
        self.grad_clip = grad_clip
        self.autocast_dtype = autocast_dtype
        self._check_setup()
        self._g_params = _optimizer_params(optimizers.generator)
        self._d_params = (
            _optimizer_params(optimizers.discriminator) if optimizers.discriminator else []
        )
        self._checked_detach = False

    def _check_setup(self) -> None:
        m, o = self.models, self.optimizers
        if m.discriminator is not None and o.discriminator is None:
            raise RunnerError(
                f"phase {self.phase.name!r}: a discriminator but no discriminator optimizer"
            )
        gen = unwrap(m.generator)
        quantiles = {
            id(p) for n, p in gen.named_parameters() if n.endswith(".quantiles") and p.requires_grad
        }
        if quantiles:
            if o.aux is None:
                raise RunnerError(
                    f"phase {self.phase.name!r}: the generator has entropy-bottleneck quantiles "
                    "but no aux optimizer (see compressai_optimizers)"
                )
            if not hasattr(gen, "aux_loss"):
                raise RunnerError(
                    f"phase {self.phase.name!r}: quantiles but no generator.aux_loss()"
                )
            in_main = quantiles & {id(p) for p in _optimizer_params(o.generator)}
            if in_main:
                raise RunnerError(
                    f"phase {self.phase.name!r}: the generator optimizer holds {len(in_main)} "
                    "quantiles tensor(s); they belong to the aux optimizer only"
                )
        if o.aux is not None and not hasattr(gen, "aux_loss"):
            raise RunnerError(
                f"phase {self.phase.name!r}: an aux optimizer but no generator.aux_loss()"
            )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # the models' device: the runner autocasts on GPU only, a benchmark may on CPU
        device = next(unwrap(self.models.generator).parameters()).device
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def forward(self, batch: Any, step: int) -> Any:
        with self._autocast():
            return self.phase.forward(self.models, batch, step)

    def discriminator_step(self, batch: Any, outputs: Any, step: int) -> dict[str, Tensor]:
        """One D update; returns its detached terms (``d_`` prefixed) and gradient norm."""
        opt = self.optimizers.discriminator
        if self.models.discriminator is None or opt is None:
            raise RunnerError(f"phase {self.phase.name!r} has no discriminator")
        opt.zero_grad(set_to_none=True)
        with self._autocast():
            terms = self.phase.discriminator_loss(self.models, batch, outputs, step)
        _check_terms(terms, step, "discriminator_loss")
        _ensure_finite(terms, step, "discriminator step")
        terms["loss"].backward()
        if not self._checked_detach:
            self._checked_detach = True
            if any(p.grad is not None for p in self._g_params):
                raise RunnerError(
                    f"phase {self.phase.name!r}: discriminator_loss sent gradients into the "
                    "generator; detach its outputs there"
                )
        norm = self._clip(self._d_params, step, "discriminator")
        opt.step()
        out = {f"d_{k}": v.detach() for k, v in terms.items()}
        out["grad_norm_discriminator"] = norm
        return out

    def generator_step(self, batch: Any, outputs: Any, step: int) -> dict[str, Tensor]:
        """One G update (and aux update); returns detached terms and gradient norm."""
        opt, aux_opt = self.optimizers.generator, self.optimizers.aux
        opt.zero_grad(set_to_none=True)
        if aux_opt is not None:
            aux_opt.zero_grad(set_to_none=True)
        d = self.models.discriminator
        with _frozen(d) if d is not None else contextlib.nullcontext():
            with self._autocast():
                terms = self.phase.generator_loss(self.models, batch, outputs, step)
            _check_terms(terms, step, "generator_loss")
            checked = dict(terms)
            total = terms["loss"]
            if aux_opt is not None:
                # quantiles get no gradient from the main loss and the aux loss reaches only
                # them, so one backward serves both optimizers (and one DDP sync)
                aux = unwrap(self.models.generator).aux_loss()
                checked["aux_loss"] = aux
                total = total + aux
            _ensure_finite(checked, step, "generator step")
            total.backward()
        norm = self._clip(self._g_params, step, "generator")
        opt.step()
        if aux_opt is not None:
            aux_opt.step()
        out = {k: v.detach() for k, v in checked.items()}
        out["grad_norm_generator"] = norm
        return out

    def step(self, batch: Any, step: int) -> dict[str, Tensor]:
        """A whole iteration: forward, D step (GAN phases), G step, schedulers."""
        outputs = self.forward(batch, step)
        terms: dict[str, Tensor] = {}
        if self.models.discriminator is not None:
            terms.update(self.discriminator_step(batch, outputs, step))
        terms.update(self.generator_step(batch, outputs, step))
        for scheduler in self.optimizers.schedulers.values():
            scheduler.step()
        return terms

    def _clip(self, params: list[Tensor], step: int, which: str) -> Tensor:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        norm = torch.nn.utils.get_total_norm(grads)
        # after DDP's all-reduce every rank holds the same gradients, so all agree here
        if not bool(torch.isfinite(norm)):
            raise NonFiniteLossError(
                f"step {step}: the {which}'s gradient norm is {norm.item()} although every "
                "loss term is finite"
            )
        if self.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)
        return norm.detach()


def _check_terms(terms: Any, step: int, where: str) -> None:
    if not isinstance(terms, Mapping) or "loss" not in terms:
        raise RunnerError(f"step {step}: {where} must return a dict with a 'loss' entry")
    for key, value in terms.items():
        if not isinstance(value, Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise RunnerError(f"step {step}: {where} term {key!r} is not a scalar tensor ({shape})")


def _ensure_finite(terms: Mapping[str, Tensor], step: int, where: str) -> None:
    """Raise on every rank alike when any rank has a NaN/inf term (a collective)."""
    keys = sorted(terms)
    values = torch.stack([terms[k].detach().float().reshape(()) for k in keys])
    codes = torch.where(torch.isnan(values), 1.0, torch.where(torch.isinf(values), 2.0, 0.0))
    if _distributed():
        import torch.distributed as dist

        gathered = [torch.empty_like(codes) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, codes)
        table = torch.stack(gathered)
    else:
        table = codes[None]
    if not bool(table.any()):
        return
    table_list = table.tolist()
    problems = []
    for j, key in enumerate(keys):
        ranks = [r for r, row in enumerate(table_list) if row[j]]
        if ranks:
            kind = "nan" if table_list[ranks[0]][j] == 1 else "inf"
            where_ranks = f" on rank(s) {ranks}" if len(table_list) > 1 else ""
            problems.append(f"{key!r} is {kind}{where_ranks}")
    raise NonFiniteLossError(f"step {step}: non-finite loss in the {where}: " + "; ".join(problems))
