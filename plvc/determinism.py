"""Deterministic execution of the entropy-model computations that encoder and decoder share.

An arithmetic/rANS decoder only works when it sees *bit-identical* probability tables
to the encoder's. The tables of a P-frame come from the recurrent probability model
(RPM), a small CNN run on the previous decoded latent, and floating-point convolutions
are not reproducible across devices (cuDNN vs. CPU kernels, TF32, different reduction
orders). Both sides therefore run that part on the CPU, in float32, with a fixed
number of intra-op threads and autocast off: :func:`deterministic_coding`.

Scope of the guarantee: same PyTorch build and CPU instruction set on both sides (which
covers "another process on the same machine" and identical deployments). Different CPU
ISAs (AVX2 vs. AVX-512) may pick different oneDNN kernels; making the probability
model bit-exact across *all* hardware would need integer networks (Ballé et al., 2019).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["CODING_DEVICE", "CODING_DTYPE", "cpu_functional_call", "deterministic_coding"]

CODING_DEVICE = torch.device("cpu")
CODING_DTYPE = torch.float32


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


def _cpu_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in tensors.items():
        value = value.detach().to(CODING_DEVICE)
        if value.is_floating_point():
            value = value.to(CODING_DTYPE)
        out[name] = value
    return out


def cpu_functional_call(module: nn.Module, *args: object) -> object:
    """Call ``module`` with CPU float32 copies of its parameters and buffers.

    The module itself may live on any device (e.g. CUDA during training); the call uses
    copies, so nothing is moved. Use inside :func:`deterministic_coding`.
    """
    state = _cpu_tensors(dict(module.named_parameters()))
    state.update(_cpu_tensors(dict(module.named_buffers())))
    return functional_call(module, state, args)
