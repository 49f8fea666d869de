"""HiFiC: the I-frame codec of PLVC.

Mentzer, Toderici, Tschannen, Agustsson, "High-Fidelity Generative Image Compression",
NeurIPS 2020 (HiFiC). Architecture after the paper's architecture figure and the authors'
release
(``tensorflow/compression/models/hific/archs.py``):

- E: conv7x7 (60) and four conv3x3 stride 2 (120, 240, 480, 960), each with ChannelNorm
  and ReLU, then conv3x3 to the latent y (220 channels).
- G: ChannelNorm, conv3x3 to 960 + ChannelNorm, 9 residual blocks with a skip over all of
  them, four transposed convs (480, 240, 120, 60) with ChannelNorm and ReLU, conv7x7 to RGB.
- Probability model: mean-scale hyperprior (Minnen et al. 2018) with 320 channels;
  ``z`` through CompressAI's ``EntropyBottleneck``, ``y`` through ``GaussianConditional``.
- D: conditional PatchGAN on ``[x, upsample(conv(ŷ))]`` with spectral norm.

Quantisation (as the release's ``round_latents_for_training`` and CompressAI's
ScaleSpaceFlow hyperprior): G sees ``round(y - μ) + μ`` with a straight-through gradient,
the rate of y uses additive uniform noise, and z is noisy in training (the release's
factorized prior layer).

Coding is deterministic: the entropy parameters (hyper-synthesis, scale indexes, means)
are computed from decoded symbols only, on the CPU in float32 with one thread
(:func:`plvc.determinism.deterministic_coding`), so a bitstream decodes to the same latent
in any process, even when the transforms ran on a GPU.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from plvc.bitstream import MAX_DIMENSION, check_payload_size, pack_fields, unpack_fields
from plvc.determinism import cpu_functional_call, deterministic_coding
from plvc.errors import BitstreamError, IntraCodecError, WeightsError
from plvc.fileio import atomic_torch_save
from plvc.intra import register_intra_codec
from plvc.weights import file_sha256

with warnings.catch_warnings():
    # CompressAI 1.2.8 calls torch.jit.script at import, which torch 2.14 deprecates
    warnings.simplefilter("ignore", FutureWarning)
    from compressai.entropy_models import EntropyBottleneck, GaussianConditional
    from compressai.models import CompressionModel
    from compressai.models.utils import conv, deconv
    from compressai.ops import quantize_ste

__all__ = [
    "HIFIC_CHECKPOINT_FORMAT",
    "HIFIC_CHECKPOINT_VERSION",
    "HIFIC_PRESETS",
    "HIFIC_WEIGHTS_PARAM",
    "ChannelNorm2d",
    "HiFiC",
    "HiFiCConfig",
    "HiFiCDiscriminator",
    "HiFiCEncoder",
    "HiFiCGenerator",
    "HiFiCIntraCodec",
    "HiFiCResidualBlock",
    "HiFiCStreamHeader",
    "hific_intra_codec",
    "load_hific",
    "pack_hific_stream",
    "save_hific",
    "unpack_hific_stream",
]

HIFIC_CHECKPOINT_FORMAT = "plvc-hific"
HIFIC_CHECKPOINT_VERSION = 1
# the factory argument naming a trained checkpoint, as errors quote it (in the pipeline it is
# paths.models/<q>/hific/hific.pt: trained by train_hific@<q>, or hific.pretrained.<q> copied)
HIFIC_WEIGHTS_PARAM = "weights="


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class HiFiCConfig:
    """Sizes of a HiFiC model (paper values in :meth:`paper`).

    ``base_channels`` is the width after the first conv; downsampling layer ``i`` has
    ``base_channels * 2**(i+1)`` channels, so the generator's residual blocks run at
    ``base_channels * 2**num_scales`` (960 in the paper).
    """

    base_channels: int = 60
    num_scales: int = 4
    latent_channels: int = 220
    residual_blocks: int = 9
    hyper_channels: int = 320
    disc_channels: int = 64

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            minimum = 0 if field.name == "residual_blocks" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(
                    f"HiFiCConfig.{field.name} must be an integer >= {minimum}, got {value!r}"
                )

    @classmethod
    def paper(cls) -> HiFiCConfig:
        """The published model: 181.5 M parameters without D (D: 2.8 M)."""
        return cls()

    @classmethod
    def small(cls) -> HiFiCConfig:
        """A narrow model for the CPU sample pipeline."""
        return cls(
            base_channels=16,
            latent_channels=64,
            residual_blocks=2,
            hyper_channels=64,
            disc_channels=16,
        )

    @classmethod
    def tiny(cls) -> HiFiCConfig:
        """The smallest useful model, for unit tests."""
        return cls(
            base_channels=8,
            latent_channels=16,
            residual_blocks=1,
            hyper_channels=16,
            disc_channels=8,
        )

    @classmethod
    def preset(cls, name: str) -> HiFiCConfig:
        """One of :data:`HIFIC_PRESETS` by name."""
        try:
            return HIFIC_PRESETS[name]()
        except KeyError:
            raise ValueError(
                f"unknown HiFiC preset {name!r}; known: {', '.join(sorted(HIFIC_PRESETS))}"
            ) from None

    @property
    def stride(self) -> int:
        """Image sides must be multiples of this: E downsamples by 2**num_scales, h_a by 4."""
        return 2**self.num_scales * 4

    @property
    def bottleneck_channels(self) -> int:
        """Width of the generator's residual blocks (960 in the paper)."""
        return self.base_channels * 2**self.num_scales

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HiFiCConfig:
        """Build from a mapping; unknown keys are an error (they would be silently lost)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a HiFiC config must be a mapping, got {type(data).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown HiFiC config key(s) {', '.join(map(str, unknown))}; "
                f"known: {', '.join(sorted(known))}"
            )
        return cls(**dict(data))


HIFIC_PRESETS = {"paper": HiFiCConfig.paper, "small": HiFiCConfig.small, "tiny": HiFiCConfig.tiny}


def _resolve_config(config: HiFiCConfig | Mapping[str, Any] | str | None) -> HiFiCConfig:
    if config is None:
        return HiFiCConfig.paper()
    if isinstance(config, HiFiCConfig):
        return config
    if isinstance(config, str):
        return HiFiCConfig.preset(config)
    return HiFiCConfig.from_dict(config)


# --------------------------------------------------------------------------- layers

#: E[ReLU(u)] for u ~ N(0, 1): the mean of each ChannelNorm+ReLU feature at init (ChannelNorm
#: makes every pixel's channel vector zero-mean and unit-variance, its affine is the identity)
_RELU_FEATURE_MEAN = 1 / math.sqrt(2 * math.pi)
#: the mean the image-space layers are centred on: mid-grey of images in [0, 1]
_MID_GREY = 0.5


@torch.no_grad()
def _centre_bias(conv: nn.Conv2d | nn.ConvTranspose2d, input_mean: float) -> None:
    """Shift ``conv``'s bias so that its output has no common offset at init when its input
    is non-negative with mean ``input_mean`` (an image in [0, 1], or ReLU features).

    Why: ChannelNorm normalises each pixel's channel vector, so it only sees its direction.
    A conv of a non-negative input adds ``input_mean * sum(W)`` to every pixel; that common
    vector dominates (85-95 % of the channel-centred energy after PyTorch's default init),
    every pixel then normalises to nearly the same vector, and E starts out blind to
    brightness and contrast: training sits at a flat grey picture until the biases have
    grown (~100 Adam steps at lr 5e-4). Subtracting the offset is the same as feeding the
    conv a zero-mean input (``x - ½`` for the image). Init only: no parameter is added and
    trained checkpoints are unaffected. For a strided transposed conv the taps that reach
    an output pixel depend on its position; the average (``sum(W) / stride²``) is removed.
    """
    weight = conv.weight
    if isinstance(conv, nn.ConvTranspose2d):  # [in, out, kh, kw]
        offset = weight.sum(dim=(0, 2, 3)) / (conv.stride[0] * conv.stride[1])
    else:  # [out, in, kh, kw]
        offset = weight.sum(dim=(1, 2, 3))
    conv.bias.sub_(input_mean * offset)


def _centre_after_relus(layers: nn.Sequential) -> None:
    """:func:`_centre_bias` every conv of ``layers`` that directly follows a ReLU."""
    previous: nn.Module | None = None
    for layer in layers:
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)) and isinstance(previous, nn.ReLU):
            _centre_bias(layer, _RELU_FEATURE_MEAN)
        previous = layer


class ChannelNorm2d(nn.Module):
    """Normalise each pixel over its channels, then a learned per-channel affine.

    HiFiC's "ChannelNorm": unlike InstanceNorm it does not depend on the image
    size, so models trained on crops work on full images. As in the authors' release the
    variance is the unbiased one and ``eps = 1e-3``. Computed in float32 under autocast.
    """

    def __init__(self, channels: int, eps: float = 1e-3, affine: bool = True) -> None:
        super().__init__()
        self.channels = channels
        self.eps = eps
        if affine:
            self.weight = nn.Parameter(torch.ones(channels))
            self.bias = nn.Parameter(torch.zeros(channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        var, mean = torch.var_mean(x32, dim=1, keepdim=True, correction=1)
        out = (x32 - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            out = out * self.weight.float().view(1, -1, 1, 1) + self.bias.float().view(1, -1, 1, 1)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.channels}, eps={self.eps}, affine={self.weight is not None}"


class HiFiCResidualBlock(nn.Sequential):
    """conv3x3-ChannelNorm-ReLU-conv3x3-ChannelNorm with an identity skip."""

    def __init__(self, channels: int) -> None:
        super().__init__(
            nn.Conv2d(channels, channels, 3, padding=1),
            ChannelNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
            ChannelNorm2d(channels),
        )
        _centre_after_relus(self)

    def forward(self, x: Tensor) -> Tensor:
        return x + super().forward(x)


class HiFiCEncoder(nn.Sequential):
    """HiFiC's encoder E: image in [0, 1] -> latent y at 1/2**num_scales resolution."""

    def __init__(self, config: HiFiCConfig) -> None:
        base = config.base_channels
        layers: list[nn.Module] = [
            nn.Conv2d(3, base, 7, padding=3),
            ChannelNorm2d(base),
            nn.ReLU(inplace=True),
        ]
        channels = base
        for i in range(config.num_scales):
            out = base * 2 ** (i + 1)
            layers += [conv(channels, out, 3, 2), ChannelNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        layers.append(conv(channels, config.latent_channels, 3, 1))
        super().__init__(*layers)
        # zero-mean pre-norm activations at init (see _centre_bias): the image as x - ½
        _centre_bias(self[0], _MID_GREY)
        _centre_after_relus(self)


class HiFiCGenerator(nn.Module):
    """HiFiC's generator G: ŷ -> image; residual blocks at the bottleneck width, global skip."""

    def __init__(self, config: HiFiCConfig) -> None:
        super().__init__()
        width = config.bottleneck_channels
        self.head = nn.Sequential(
            ChannelNorm2d(config.latent_channels),
            conv(config.latent_channels, width, 3, 1),
            ChannelNorm2d(width),
        )
        self.blocks = nn.Sequential(
            *(HiFiCResidualBlock(width) for _ in range(config.residual_blocks))
        )
        tail: list[nn.Module] = []
        channels = width
        for scale in reversed(range(config.num_scales)):
            out = config.base_channels * 2**scale
            tail += [deconv(channels, out, 3, 2), ChannelNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        tail.append(nn.Conv2d(channels, 3, 7, padding=3))
        self.tail = nn.Sequential(*tail)
        # zero-mean pre-norm activations at init (see _centre_bias)
        _centre_after_relus(self.tail)
        # G starts at the mid-grey image, not at random noise around 0 (std ~0.3 with the
        # default init, which the first steps spend unlearning): the output conv starts at
        # zero, it gets its gradient from the first step and passes it on from the second
        with torch.no_grad():
            self.tail[-1].weight.zero_()
            self.tail[-1].bias.fill_(_MID_GREY)

    def forward(self, y_hat: Tensor) -> Tensor:
        head = self.head(y_hat)
        return self.tail(self.blocks(head) + head)


class _HyperSynthesis(nn.Module):
    """Two hyper-synthesis nets (HiFiC release): ẑ -> (scales, means) of y."""

    def __init__(self, hyper_channels: int, latent_channels: int) -> None:
        super().__init__()

        def make() -> nn.Sequential:
            return nn.Sequential(
                deconv(hyper_channels, hyper_channels, 5, 2),
                nn.ReLU(inplace=True),
                deconv(hyper_channels, hyper_channels, 5, 2),
                nn.ReLU(inplace=True),
                conv(hyper_channels, latent_channels, 3, 1),
            )

        self.scale = make()
        self.mean = make()

    def forward(self, z_hat: Tensor) -> tuple[Tensor, Tensor]:
        return self.scale(z_hat), self.mean(z_hat)


# --------------------------------------------------------------------------- model


class HiFiC(CompressionModel):
    """HiFiC auto-encoder with a mean-scale hyperprior (the CompressAI model API).

    ``forward`` trains (noise for the rate, straight-through rounding for G's input);
    ``compress``/``decompress`` write and read real bitstreams. Call :meth:`update` with
    ``force=True`` after training and before coding.
    """

    #: CPU threads of :meth:`synthesize`; pixels are bit-exact between processes that agree
    decode_threads: int = 1

    def __init__(self, config: HiFiCConfig | None = None) -> None:
        super().__init__()
        self.config = config or HiFiCConfig.paper()
        c = self.config
        self.g_a = HiFiCEncoder(c)
        self.g_s = HiFiCGenerator(c)
        self.h_a = nn.Sequential(
            conv(c.latent_channels, c.hyper_channels, 3, 1),
            nn.ReLU(inplace=True),
            conv(c.hyper_channels, c.hyper_channels, 5, 2),
            nn.ReLU(inplace=True),
            conv(c.hyper_channels, c.hyper_channels, 5, 2),
        )
        self.h_s = _HyperSynthesis(c.hyper_channels, c.latent_channels)
        self.entropy_bottleneck = EntropyBottleneck(c.hyper_channels)
        self.gaussian_conditional = GaussianConditional(None)

    @property
    def stride(self) -> int:
        """Input sides must be multiples of this (64 for the paper's model)."""
        return self.config.stride

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.size(1) != 3:
            raise ValueError(f"HiFiC expects images [B, 3, H, W], got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.stride or w % self.stride:
            raise ValueError(
                f"HiFiC needs image sides that are multiples of {self.stride}, got {h}x{w}; "
                "pad first (the 'hific' intra codec pads and crops for you)"
            )

    def forward(self, x: Tensor) -> dict[str, Any]:
        """Training/validation pass.

        Returns ``x_hat``, ``likelihoods`` (noisy in training: the rate to minimise),
        ``likelihoods_quantized`` (of the rounded latents, for the rate-target switch) and
        ``y_hat`` (the quantised latent G sees, which also conditions D).
        """
        self._check_input(x)
        y = self.g_a(x)
        z = self.h_a(y)
        with torch.autocast(device_type=x.device.type, enabled=False):
            y32, z32 = y.float(), z.float()
            z_tilde, z_likelihoods = self.entropy_bottleneck(z32)
            scales, means = self.h_s(z_tilde)
            _, y_likelihoods = self.gaussian_conditional(y32, scales, means)
            y_hat = quantize_ste(y32 - means) + means
            if self.training:
                with torch.no_grad():
                    _, y_q = self.gaussian_conditional(y32, scales, means, training=False)
                    _, z_q = self.entropy_bottleneck(z32, training=False)
                quantized = {"y": y_q, "z": z_q}
            else:
                quantized = {"y": y_likelihoods, "z": z_likelihoods}
        x_hat = self.g_s(y_hat.to(y.dtype))
        return {
            "x_hat": x_hat,
            "likelihoods": {"y": y_likelihoods, "z": z_likelihoods},
            "likelihoods_quantized": quantized,
            "y_hat": y_hat,
        }

    def _cpu_gaussian_conditional(self) -> GaussianConditional:
        gc = self.gaussian_conditional
        on_cpu = all(t.device.type == "cpu" for t in gc.buffers())
        if on_cpu and gc.scale_table.dtype == torch.float32:
            return gc
        gc = copy.deepcopy(gc).cpu()
        gc.scale_table = gc.scale_table.float()
        return gc

    def _entropy_parameters(self, z_hat: Tensor) -> tuple[Tensor, Tensor, GaussianConditional]:
        """CDF indexes and means of y from decoded ẑ: the part both sides must agree on.

        One image at a time: CPU kernels may pick another algorithm for another batch
        size, and the decoder must not depend on how the encoder batched its images.
        """
        gc = self._cpu_gaussian_conditional()
        with deterministic_coding() as device:
            z_cpu = z_hat.detach().to(device, torch.float32)
            params = [cpu_functional_call(self.h_s, z_cpu[i : i + 1]) for i in range(len(z_cpu))]
            scales = torch.cat([scale for scale, _ in params])
            means = torch.cat([mean for _, mean in params])
            indexes = gc.build_indexes(scales)
        return indexes, means, gc

    @torch.no_grad()
    def compress(self, x: Tensor) -> dict[str, Any]:
        """Encode images to ``{"strings": [y_strings, z_strings], "shape": z_hw}``.

        Also returns ``y_hat`` (CPU float32), the exact latent the decoder will rebuild, so
        the encoder can get the decoded pixels with :meth:`synthesize` without decoding.
        """
        self._check_input(x)
        y = self.g_a(x)
        z = self.h_a(y)
        z_strings = self.entropy_bottleneck.compress(z.float())
        # derive everything below from the decoded symbols, exactly as the decoder does
        z_hat = self.entropy_bottleneck.decompress(z_strings, z.shape[-2:])
        indexes, means, gc = self._entropy_parameters(z_hat)
        with deterministic_coding():
            y_cpu = y.detach().to("cpu", torch.float32)
            symbols = gc.quantize(y_cpu, "symbols", means)
            y_strings = gc.compress(y_cpu, indexes, means)
            y_hat = gc.dequantize(symbols, means)
        return {
            "strings": [y_strings, z_strings],
            "shape": tuple(int(s) for s in z.shape[-2:]),
            "y_hat": y_hat,
        }

    @torch.no_grad()
    def decompress_latent(self, strings: list[list[bytes]], shape: tuple[int, int]) -> Tensor:
        """Decode ``ŷ`` (CPU float32) from :meth:`compress`'s strings and shape."""
        if not isinstance(strings, (list, tuple)) or len(strings) != 2:
            raise ValueError("HiFiC strings must be [y_strings, z_strings]")
        z_hat = self.entropy_bottleneck.decompress(list(strings[1]), tuple(shape))
        indexes, means, gc = self._entropy_parameters(z_hat)
        with deterministic_coding():
            return gc.decompress(list(strings[0]), indexes, torch.float32, means)

    @torch.no_grad()
    def synthesize(self, y_hat: Tensor) -> Tensor:
        """G on decoded latents, on the model's device, clamped to [0, 1].

        Reproducible pixels: one image at a time (kernels for another batch size differ in
        the last bits) and, on the CPU, with :attr:`decode_threads` intra-op threads
        (oneDNN's reductions depend on the thread count). Encoder and decoder must use
        the same ``decode_threads``.
        """
        param = next(self.g_s.parameters())
        y_hat = y_hat.to(param.device, param.dtype)
        threads = self.decode_threads if param.device.type == "cpu" else torch.get_num_threads()
        with deterministic_coding(num_threads=threads):
            images = [self.g_s(y_hat[i : i + 1]) for i in range(len(y_hat))]
        return torch.cat(images).clamp_(0, 1)

    @torch.no_grad()
    def decompress(self, strings: list[list[bytes]], shape: tuple[int, int]) -> dict[str, Tensor]:
        """Decode ``{"x_hat"}`` from :meth:`compress`'s strings and shape."""
        return {"x_hat": self.synthesize(self.decompress_latent(strings, shape))}


# --------------------------------------------------------------------------- discriminator


class HiFiCDiscriminator(nn.Module):
    """HiFiC's conditional PatchGAN D(x, ŷ), as in the authors' release.

    ŷ -> conv3x3 to 12 channels + LeakyReLU(0.2) -> nearest upsample to the image size,
    concatenated with the image; conv4x4 stride 2 at 64, 128, 256, conv4x4 stride 1 at
    512, conv4x4 to one logit per patch. Spectral norm on every conv. The latent is
    detached, as in the release: D must not shape the encoder through its condition.
    """

    def __init__(self, latent_channels: int, channels: int = 64, num_downsampling: int = 3) -> None:
        super().__init__()
        self.latent_conv = spectral_norm(nn.Conv2d(latent_channels, 12, 3, padding=1))
        layers: list[nn.Module] = []
        in_ch, out_ch = 3 + 12, channels
        for _ in range(num_downsampling):
            layers += [spectral_norm(nn.Conv2d(in_ch, out_ch, 4, 2, 1)), nn.LeakyReLU(0.2)]
            in_ch, out_ch = out_ch, min(out_ch * 2, channels * 8)
        # stride-1 4x4 convs keep the size with TF's "same" padding: 1 before, 2 after
        layers += [
            nn.ZeroPad2d((1, 2, 1, 2)),
            spectral_norm(nn.Conv2d(in_ch, out_ch, 4, 1)),
            nn.LeakyReLU(0.2),
            nn.ZeroPad2d((1, 2, 1, 2)),
            spectral_norm(nn.Conv2d(out_ch, 1, 4, 1)),
        ]
        self.body = nn.Sequential(*layers)

    @classmethod
    def from_config(cls, config: HiFiCConfig) -> HiFiCDiscriminator:
        return cls(config.latent_channels, config.disc_channels)

    def forward(self, image: Tensor, y_hat: Tensor) -> Tensor:
        """Patch logits ``[B, 1, H/8, W/8]`` (pre-sigmoid) for images in [0, 1]."""
        latent = F.leaky_relu(self.latent_conv(y_hat.detach().to(image.dtype)), 0.2)
        latent = F.interpolate(latent, size=image.shape[-2:], mode="nearest")
        return self.body(torch.cat([image, latent], dim=1))


# --------------------------------------------------------------------------- checkpoints


def _plain(value: Any, where: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} must hold only plain JSON types: {exc}") from None


def save_hific(
    path: str | os.PathLike[str], model: HiFiC, meta: Mapping[str, Any] | None = None
) -> Path:
    """Write a checkpoint atomically (temp file + rename) after refreshing the CDF tables.

    The file is a ``torch.save`` dict of plain types: format tag, version, config, meta and
    the state dict (CPU tensors), readable with ``torch.load(weights_only=True)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # stale tables from an earlier update() would make the coder disagree with the model
    model.update(force=True)
    payload = {
        "format": HIFIC_CHECKPOINT_FORMAT,
        "version": HIFIC_CHECKPOINT_VERSION,
        "config": model.config.to_dict(),
        "meta": _plain(dict(meta or {}), "HiFiC checkpoint meta"),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    atomic_torch_save(payload, path)
    return path


def load_hific(
    path: str | os.PathLike[str] | bytes, device: str | torch.device = "cpu"
) -> tuple[HiFiC, dict[str, Any]]:
    """Read a :func:`save_hific` checkpoint (a file, or its bytes as a codec bundle embeds
    them): ``(model in eval mode, meta)``.

    Raises :class:`~plvc.errors.WeightsError` naming ``path`` when the file is missing,
    unreadable, not a PLVC HiFiC checkpoint, of a newer version, or does not fit its config.
    """
    if isinstance(path, bytes):
        source: Any = io.BytesIO(path)
        path = Path("<embedded HiFiC weights>")
    else:
        path = source = Path(path)
        if not path.is_file():
            raise WeightsError(f"HiFiC weights file {path} does not exist")
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read HiFiC weights file {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != HIFIC_CHECKPOINT_FORMAT:
        raise WeightsError(
            f"{path} is not a PLVC HiFiC checkpoint (expected format tag "
            f"{HIFIC_CHECKPOINT_FORMAT!r}; write one with plvc.hific.save_hific)"
        )
    version = payload.get("version")
    if not isinstance(version, int) or not 1 <= version <= HIFIC_CHECKPOINT_VERSION:
        raise WeightsError(
            f"{path}: HiFiC checkpoint version {version!r} is not supported "
            f"(this library reads up to {HIFIC_CHECKPOINT_VERSION})"
        )
    try:
        config = HiFiCConfig.from_dict(payload.get("config"))
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{path}: bad HiFiC config in checkpoint: {exc}") from exc
    state = payload.get("state_dict")
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: checkpoint has no state_dict")
    model = HiFiC(config)
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise WeightsError(f"{path}: weights do not fit HiFiC config {config}: {exc}") from exc
    if model.entropy_bottleneck._quantized_cdf.numel() == 0:
        raise WeightsError(
            f"{path}: checkpoint has no entropy-coder tables (saved before update())"
        )
    meta = payload.get("meta") or {}
    return model.to(device).eval(), dict(meta)


# --------------------------------------------------------------------------- bitstream framing

_MAGIC = b"HF"
_STREAM_VERSION = 1
_PAYLOAD = "HiFiC intra stream"


@dataclass(frozen=True)
class HiFiCStreamHeader:
    """What a HiFiC intra stream says about itself."""

    height: int
    width: int
    latent_shape: tuple[int, int]


def pack_hific_stream(height: int, width: int, y_string: bytes, z_string: bytes) -> bytes:
    """Frame one image: ``b"HF"``, a version byte, then :func:`plvc.bitstream.pack_fields`
    of ``[H, W]`` and ``[y, z]`` strings (varint lengths: ~12 bytes of overhead).

    The latent shape follows from H, W and the model's stride, so it is not stored.
    """
    return _MAGIC + bytes([_STREAM_VERSION]) + pack_fields([height, width], [y_string, z_string])


def unpack_hific_stream(data: bytes, stride: int) -> tuple[HiFiCStreamHeader, bytes, bytes]:
    """Parse :func:`pack_hific_stream`: ``(header, y_string, z_string)``.

    Raises :class:`~plvc.errors.BitstreamError` for foreign, truncated or corrupt data.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BitstreamError(f"a {_PAYLOAD} must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 3 or data[:2] != _MAGIC:
        raise BitstreamError(f"not a {_PAYLOAD} (bad magic {data[:2]!r})")
    if data[2] != _STREAM_VERSION:
        raise BitstreamError(
            f"{_PAYLOAD} version {data[2]} is not supported (this library reads {_STREAM_VERSION})"
        )
    ints, strings = unpack_fields(data[3:], _PAYLOAD)
    if len(ints) != 2 or len(strings) != 2:
        raise BitstreamError(
            f"{_PAYLOAD}: expected 2 integers and 2 strings, found {len(ints)} and {len(strings)}"
        )
    height, width = ints
    if not (0 < height <= MAX_DIMENSION and 0 < width <= MAX_DIMENSION):
        raise BitstreamError(f"{_PAYLOAD}: image size {width}x{height} out of range")
    # z lives at 1/stride of the padded image
    shape = (math.ceil(height / stride), math.ceil(width / stride))
    return HiFiCStreamHeader(height, width, shape), strings[0], strings[1]


# --------------------------------------------------------------------------- intra codec


class HiFiCIntraCodec:
    """:class:`~plvc.intra.IntraCodec` over a HiFiC model.

    ``encode`` pads the image to the model's stride by edge replication and ``decode``
    crops back. Decoded images are rounded to 8-bit levels, like any image codec's
    output, so the PNG the I-frame stage stores is exactly the reference a video decoder
    later uses. :attr:`config` rebuilds the same codec with ``get_intra_codec("hific", ...)``.
    """

    name = "hific"

    def __init__(self, model: HiFiC, config: Mapping[str, Any] | None = None) -> None:
        self.model = model.eval()
        self.stride = model.stride
        if model.entropy_bottleneck._quantized_cdf.numel() == 0:
            model.update(force=True)
        self._config = dict(config) if config is not None else {"config": model.config.to_dict()}

    @property
    def config(self) -> dict[str, Any]:
        """JSON keyword arguments of :func:`hific_intra_codec` that rebuild this codec."""
        return dict(self._config)

    @property
    def trained(self) -> bool:
        """False for a randomly initialised model (smoke tests only)."""
        return "weights_sha256" in self._config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> HiFiCIntraCodec:
        """Move the model to ``device`` (the entropy parameters stay on the CPU copy)."""
        self.model.to(device)
        return self

    def _padded(self, image: Tensor) -> Tensor:
        if not isinstance(image, Tensor) or image.dim() != 3 or image.size(0) != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise IntraCodecError(f"hific: expected an image tensor [3, H, W], got {shape}")
        if not image.is_floating_point():
            raise IntraCodecError(f"hific: expected a float image in [0, 1], got {image.dtype}")
        if not torch.isfinite(image).all():
            raise IntraCodecError("hific: the image holds NaN or infinite values")
        height, width = image.shape[-2:]
        if not (0 < height <= MAX_DIMENSION and 0 < width <= MAX_DIMENSION):
            raise IntraCodecError(f"hific: unsupported image size {width}x{height}")
        x = image.detach().to(self.device, torch.float32).clamp(0, 1).unsqueeze(0)
        pad_h, pad_w = -height % self.stride, -width % self.stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        return x

    def encode(self, image: Tensor) -> bytes:
        """Code one image ``[3, H, W]`` with values in [0, 1] to a framed bitstream."""
        out = self.model.compress(self._padded(image))
        (y_string,), (z_string,) = out["strings"]
        return pack_hific_stream(int(image.size(1)), int(image.size(2)), y_string, z_string)

    def decode(self, data: bytes, expected_size: tuple[int, int] | None = None) -> Tensor:
        """Decode :meth:`encode`'s bytes to a CPU float32 image ``[3, H, W]`` on 8-bit levels
        (``expected_size``: see :meth:`plvc.intra.IntraCodec.decode`)."""
        header, y_string, z_string = unpack_hific_stream(data, self.stride)
        check_payload_size(_PAYLOAD, (header.height, header.width), expected_size)
        try:
            x_hat = self.model.decompress([[y_string], [z_string]], header.latent_shape)["x_hat"]
        except (RuntimeError, ValueError) as exc:
            raise BitstreamError(f"{_PAYLOAD} cannot be decoded: {exc}") from exc
        x_hat = x_hat[0, :, : header.height, : header.width].float().cpu()
        return x_hat.mul(255).round_().div_(255)

    @torch.no_grad()
    def estimate_bits(self, image: Tensor) -> float:
        """Rate the entropy model predicts: ``sum(-log2 p)`` (no coder or framing overhead)."""
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model(self._padded(image))
        finally:
            self.model.train(was_training)
        return float(sum((-torch.log2(lik)).sum() for lik in out["likelihoods"].values()))


def hific_intra_codec(
    *,
    weights: str | os.PathLike[str] | None = None,
    weights_data: bytes | None = None,
    weights_sha256: str | None = None,
    config: HiFiCConfig | Mapping[str, Any] | str | None = None,
    allow_random_init: bool = False,
    seed: int = 0,
    decode_threads: int = 1,
    device: str | torch.device = "cpu",
) -> HiFiCIntraCodec:
    """Factory registered as intra codec ``"hific"``.

    ``weights``: a :func:`save_hific` checkpoint (the pipeline's
    ``paths.models/<q>/hific/hific.pt``, from ``train_hific@<q>`` or ``hific.pretrained.<q>``);
    its config wins, and a different ``config`` is an error. ``weights_data``: the same
    file's bytes (a codec bundle's, :mod:`plvc.weights`); the codec's config then names
    no file, only the digest. ``weights_sha256`` (stored
    in streams by :attr:`HiFiCIntraCodec.config`) rejects a different file. Without
    weights the call must say ``allow_random_init=True``: the model is then initialised
    from ``seed``, so encoder and decoder build the same untrained codec (smoke runs).
    ``decode_threads``: CPU threads of the generator when decoding (see
    :meth:`HiFiC.synthesize`); kept in :attr:`HiFiCIntraCodec.config` when not 1, so a
    stream's decoder uses the encoder's setting and gets the same pixels.
    """
    if not isinstance(decode_threads, int) or decode_threads < 1:
        raise IntraCodecError(
            f"hific: decode_threads must be an integer >= 1, got {decode_threads!r}"
        )
    extra = {"decode_threads": decode_threads} if decode_threads != 1 else {}
    try:
        wanted = _resolve_config(config) if config is not None else None
    except ValueError as exc:
        raise IntraCodecError(f"hific: bad config: {exc}") from exc
    if weights_data is not None or (weights is not None and str(weights) != ""):
        path: Path | bytes = Path(weights) if weights_data is None else bytes(weights_data)
        where = "embedded weights" if isinstance(path, bytes) else f"{HIFIC_WEIGHTS_PARAM}{path}"
        try:
            model, _ = load_hific(path, device=device)
        except WeightsError as exc:
            raise WeightsError(f"hific intra codec, {where}: {exc}") from exc
        digest = hashlib.sha256(path).hexdigest() if isinstance(path, bytes) else file_sha256(path)
        if weights_sha256 is not None and digest != weights_sha256:
            raise WeightsError(
                f"hific intra codec, {where}: SHA-256 {digest[:16]}..., "
                f"the stream was coded with {weights_sha256[:16]}...: a different file"
            )
        if wanted is not None and wanted != model.config:
            raise IntraCodecError(
                f"hific: config {wanted} does not match the checkpoint {path} "
                f"({model.config}); drop the config or use matching weights"
            )
        model.decode_threads = decode_threads
        named = {} if isinstance(path, bytes) else {"weights": str(path)}
        return HiFiCIntraCodec(model, {**named, "weights_sha256": digest, **extra})
    if not allow_random_init:
        raise IntraCodecError(
            "the 'hific' intra codec needs trained weights: pass "
            f"{HIFIC_WEIGHTS_PARAM} a checkpoint written by plvc.hific.save_hific (the "
            "pipeline's: paths.models/<q>/hific/hific.pt, from train_hific@<q> or "
            "hific.pretrained.<q>), or allow_random_init=True to code with an untrained, "
            "seeded model (smoke tests only)"
        )
    resolved = wanted or HiFiCConfig.paper()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HiFiC(resolved)
    # the CDF tables come from the CPU copy so every process derives the same ones
    model.update(force=True)
    model.decode_threads = decode_threads
    spec = {"config": resolved.to_dict(), "allow_random_init": True, "seed": int(seed), **extra}
    return HiFiCIntraCodec(model.to(device), spec)


register_intra_codec("hific", hific_intra_codec)
