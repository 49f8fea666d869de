"""Deterministic execution of what encoder and decoder must compute identically.

An arithmetic/rANS decoder only works when it sees *bit-identical* probability tables
to the encoder's. The tables of a P-frame come from the recurrent probability model
(RPM), a small CNN run on the previous decoded latent, and floating-point convolutions
are not reproducible across devices (cuDNN vs. CPU kernels, TF32, different reduction
orders, thread counts). :class:`CodingMode` says how a stream's networks ran; the
stream header records it (format 3) and the decoder runs them the same way:

- ``entropy_parameters="portable"`` (default): the RPM runs on the CPU, float32, one
  intra-op thread, plain NCHW tensors, whatever device the frames are on and whatever
  the other settings (:func:`deterministic_coding`). The latents a decoder entropy-decodes
  then do not depend on its thread count, memory format, precision or accelerator.
- ``entropy_parameters="device"``: the RPM runs where the frames are, float32, with
  deterministic algorithms (cuDNN without autotuning or TF32; on the CPU the stream's
  thread count). Bit-exact on the same device type and PyTorch build, as CompressAI and
  DCVC promise, and no device-to-host copy per frame.
- ``entropy_parameters="exact"``: the RPM runs on the CPU with exact integer convolutions
  and libm-free non-linearities (:mod:`plvc.exact`): the latents decode identically on any
  machine, instruction set and thread count, at about twice the portable mode's RPM time.
- ``precision``: ``"float32"`` or ``"bfloat16"`` (autocast for the transforms, flow and
  motion compensation; the entropy parameters always run in float32).
- ``channels_last``: the transforms' memory format (faster CPU kernels, other last bits).

Scope of "portable": same PyTorch build and CPU instruction set on both sides (which
covers "another process on the same machine", other thread counts and identical
deployments). Other CPU ISAs may pick other oneDNN kernels (measured on this project's
test model: AVX-512 and AVX2 agree on the latents, the baseline SSE kernels do not); the
``"exact"`` mode covers all hardware.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from plvc.errors import PLVCError

__all__ = [
    "CODING_DEVICE",
    "CODING_DTYPE",
    "ENTROPY_PARAMETER_MODES",
    "PRECISIONS",
    "CodingMode",
    "cpu_functional_call",
    "deterministic_coding",
    "device_coding",
]

CODING_DEVICE = torch.device("cpu")
CODING_DTYPE = torch.float32
ENTROPY_PARAMETER_MODES = ("portable", "device", "exact")
PRECISIONS = ("float32", "bfloat16")

# header flag bits (format 3); format 1-2 streams are all zero (CodingMode.legacy()):
# bits 0-1 the entropy-parameter mode (its index in ENTROPY_PARAMETER_MODES), then these
_ENTROPY_MASK = 3
_FLAG_BFLOAT16 = 4
_FLAG_CHANNELS_LAST = 8
_KNOWN_FLAGS = _ENTROPY_MASK | _FLAG_BFLOAT16 | _FLAG_CHANNELS_LAST


@dataclass(frozen=True)
class CodingMode:
    """How the networks of a stream run (see the module docstring); one header byte."""

    entropy_parameters: str = "portable"
    precision: str = "float32"
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.entropy_parameters not in ENTROPY_PARAMETER_MODES:
            raise PLVCError(
                f"entropy_parameters must be one of {ENTROPY_PARAMETER_MODES}, "
                f"got {self.entropy_parameters!r}"
            )
        if self.precision not in PRECISIONS:
            raise PLVCError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not isinstance(self.channels_last, bool):
            raise PLVCError(f"channels_last must be a bool, got {self.channels_last!r}")

    @classmethod
    def legacy(cls) -> CodingMode:
        """What format 1 and 2 streams were coded with: portable, float32, NCHW."""
        return cls(channels_last=False)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of the transforms, ``None`` for float32 (autocast off)."""
        return torch.bfloat16 if self.precision == "bfloat16" else None

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def to_flags(self) -> int:
        return (
            ENTROPY_PARAMETER_MODES.index(self.entropy_parameters)
            | (_FLAG_BFLOAT16 if self.precision == "bfloat16" else 0)
            | (_FLAG_CHANNELS_LAST if self.channels_last else 0)
        )

    @classmethod
    def from_flags(cls, flags: int) -> CodingMode:
        """The mode of a header's flag byte; unknown bits raise :class:`PLVCError`."""
        if flags & ~_KNOWN_FLAGS or flags & _ENTROPY_MASK >= len(ENTROPY_PARAMETER_MODES):
            raise PLVCError(
                f"coding flags {flags:#04x} use bits this build does not know "
                f"(known: {_KNOWN_FLAGS:#04x})"
            )
        return cls(
            entropy_parameters=ENTROPY_PARAMETER_MODES[flags & _ENTROPY_MASK],
            precision="bfloat16" if flags & _FLAG_BFLOAT16 else "float32",
            channels_last=bool(flags & _FLAG_CHANNELS_LAST),
        )

    def describe(self) -> str:
        layout = "channels-last" if self.channels_last else "NCHW"
        return f"entropy parameters {self.entropy_parameters}, {self.precision}, {layout}"


@contextmanager
def deterministic_coding(num_threads: int = 1) -> Iterator[torch.device]:
    """Run the enclosed entropy-parameter computations reproducibly on the CPU.

    Sets ``torch.set_num_threads(num_threads)``, disables autograd and CPU autocast, and
    restores everything on exit. Yields the device to run on (the CPU). Not thread-safe:
    the thread count is process-global.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        with torch.no_grad(), torch.autocast(device_type="cpu", enabled=False):
            yield CODING_DEVICE
    finally:
        torch.set_num_threads(previous_threads)


@contextmanager
def device_coding(device: torch.device) -> Iterator[torch.device]:
    """Run the enclosed entropy-parameter computations on ``device`` in float32 with
    deterministic algorithms: no autograd, no autocast, on CUDA no cuDNN autotuning and no
    TF32. The CPU thread count is the caller's (the stream's). Yields ``device``."""
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        if device.type != "cuda":
            yield device
            return
        cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
        previous = (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
        cudnn.deterministic, cudnn.benchmark = True, False
        cudnn.allow_tf32 = matmul.allow_tf32 = False
        try:
            yield device
        finally:
            cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = previous


def _cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in tensors.items():
        # NCHW whatever the model's memory format: the portable tables must not depend on it
        value = value.detach().to(CODING_DEVICE).contiguous()
        if value.is_floating_point():
            value = value.to(CODING_DTYPE)
        out[name] = value
    return out


def cpu_functional_call(module: nn.Module, *args: object) -> object:
    """Call ``module`` with CPU float32 NCHW copies of its parameters and buffers.

    The module itself may live on any device (e.g. CUDA during training) and in any memory
    format; the call uses copies, so nothing is moved. Tensor arguments must be CPU
    float32 NCHW. Use inside :func:`deterministic_coding`.
    """
    state = _cpu_tensors(dict(module.named_parameters()))
    state.update(_cpu_tensors(dict(module.named_buffers())))
    return functional_call(module, state, args)
