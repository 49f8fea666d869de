"""The learning-speed anchor: CompressAI's ``bmshj2018-hyperprior`` (Ballé et al., "Variational
image compression with a scale hyperprior", ICLR 2018), random init, trained by the same runner
on the same crops as HiFiC with its usual loss ``R + λ·255²·MSE``.

It is the reference for how fast a well-known image codec learns on this data and hardware
(``benchmarks/learning.py``): a HiFiC that learns much slower than it at equal steps and wall
time has a problem of its own. Not part of the DVC pipeline.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.train.phase import PhaseModels, TrainingPhase
from pipeline.train.phases.hific import ImageCropBatches

__all__ = [
    "HyperpriorAnchor",
    "HyperpriorAnchorPhase",
    "load_anchor",
]

#: what the hyperprior's encoder downsamples by (4 stride-2 convs, 2 more in the hyper path)
ANCHOR_STRIDE = 64


class HyperpriorAnchor(nn.Module):
    """``compressai.zoo.bmshj2018_hyperprior(quality, pretrained=False)`` with the
    ``aux_loss`` the runner expects, and a real-bitstream round trip."""

    def __init__(self, quality: int = 3) -> None:
        super().__init__()
        from compressai.zoo import bmshj2018_hyperprior

        self.quality = quality
        self.net = bmshj2018_hyperprior(quality=quality, pretrained=False)

    def forward(self, x: Tensor) -> dict[str, Any]:
        return self.net(x)

    def aux_loss(self) -> Tensor:
        return self.net.aux_loss()

    @torch.no_grad()
    def encode(self, image: Tensor) -> bytes:
        """One image ``[3, H, W]`` in [0, 1] as a bitstream: image size, latent shape and the
        y and z string lengths (big-endian uint32), then the strings. Call :meth:`update`
        once after training first (entropy-coder tables)."""
        h, w = image.shape[-2:]
        x = F.pad(image[None], (0, -w % ANCHOR_STRIDE, 0, -h % ANCHOR_STRIDE), mode="replicate")
        out = self.net.compress(x)
        parts = [s[0] for s in out["strings"]]
        header = np.array([h, w, *out["shape"], *(len(p) for p in parts)], dtype=">u4")
        return header.tobytes() + b"".join(parts)

    @torch.no_grad()
    def decode(self, data: bytes) -> Tensor:
        """The image :meth:`encode` coded into ``data``: ``[3, H, W]`` in [0, 1]."""
        h, w, sh, sw, ny, nz = np.frombuffer(data[:24], dtype=">u4").tolist()
        y, z = data[24 : 24 + ny], data[24 + ny : 24 + ny + nz]
        x_hat = self.net.decompress([[y], [z]], [sh, sw])["x_hat"]
        return x_hat[0, :, :h, :w].clamp(0, 1)

    def update(self) -> None:
        self.net.update(force=True)


def load_anchor(path: str | Path) -> HyperpriorAnchor:
    """An exported ``anchor.pt``, with its entropy-coder tables built."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = HyperpriorAnchor(int(state["quality"]))
    model.load_state_dict(state["state_dict"])
    model.eval()
    model.update()
    return model


@dataclasses.dataclass
class HyperpriorAnchorPhase(ImageCropBatches, TrainingPhase):
    """The hyperprior trained with ``bpp + lmbda·255²·MSE`` on HiFiC's crops
    (:class:`~pipeline.train.phases.hific.ImageCropBatches`, same RNG draws)."""

    name: ClassVar[str] = "hyperprior_anchor"

    quality: int = 3
    lmbda: float = 0.013
    lr: float = 1e-4
    aux_lr: float = 1e-3
    batch_size: int = 8
    frames_per_clip: int = 1
    crop: int = 128
    random_flip: bool = True

    def build_models(self) -> PhaseModels:
        return PhaseModels(HyperpriorAnchor(self.quality))

    def generator_loss(
        self, models: PhaseModels, batch: Tensor, outputs: dict[str, Any], step: int
    ) -> dict[str, Tensor]:
        x = outputs["x"]
        pixels = x.shape[0] * x.shape[-2] * x.shape[-1]
        bpp = sum(
            torch.log(lik).sum() / (-math.log(2) * pixels)
            for lik in outputs["likelihoods"].values()
        )
        mse = F.mse_loss(outputs["x_hat"], x)
        return {
            "loss": bpp + self.lmbda * 255**2 * mse,
            "bpp": bpp.detach(),
            "mse": mse.detach(),
            "psnr": -10 * torch.log10(mse.detach().clamp_min(1e-10)),
        }

    def export(self, models: PhaseModels, export_dir: Path) -> None:
        model = models.generator
        state = {"quality": model.quality, "state_dict": model.state_dict()}
        torch.save(state, export_dir / "anchor.pt")

    def read_init_weights(self, path: Path) -> dict[str, dict[str, Tensor]]:
        state = torch.load(Path(path) / "anchor.pt", map_location="cpu", weights_only=True)
        return {"generator": state["state_dict"]}
