"""CompressAI image models as PLVC intra (I-frame) codecs.

Registers ``"compressai"``: any ``compressai.zoo.image_models`` architecture (e.g.
``bmshj2018-hyperprior``, ``mbt2018-mean``) at a zoo quality level. Pretrained zoo
weights are downloaded by CompressAI from the internet, which this codec never does:
give ``weights`` (a state-dict file) for a trained codec. Without weights the call must
say ``allow_random_init=True``: the network is then initialised from ``seed`` --
reproducible in any process, so streams still decode bit-exactly, but
:attr:`CompressAIIntraCodec.trained` is ``False`` and the pictures are meaningless; use
it for tests and timing only.

Determinism: the decoder must rebuild the entropy coder's probability tables
bit-identically. For the factorized and (mean-)scale hyperprior families the analysis
and synthesis transforms run on the codec's device while everything that feeds the
entropy coder (the hyper-synthesis ``h_s`` and the entropy models) runs on CPU copies
under :func:`plvc.determinism.deterministic_coding`, so a stream coded on a GPU decodes
on a CPU. Autoregressive architectures (``mbt2018``, ``cheng2020-*``) interleave the
context model with decoding and therefore run entirely on the CPU.
"""

from __future__ import annotations

import copy
import hashlib
import io
import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from plvc.bitstream import (
    MAX_DIMENSION,
    check_payload_size,
    pack_fields,
    pad_for_rans,
    unpack_fields,
)
from plvc.determinism import deterministic_coding
from plvc.errors import BitstreamError, IntraCodecError
from plvc.intra import register_intra_codec
from plvc.weights import file_sha256

__all__ = ["ARCHITECTURES", "CompressAIIntraCodec", "file_sha256"]

with warnings.catch_warnings():
    # CompressAI 1.2.8 calls torch.jit.script at import, which torch 2.14 deprecates
    warnings.simplefilter("ignore", FutureWarning)
    import compressai.zoo as _zoo
    from compressai.models import (
        FactorizedPrior,
        FactorizedPriorReLU,
        MeanScaleHyperprior,
        ScaleHyperprior,
    )
    from compressai.zoo.pretrained import load_pretrained as _rename_pretrained_keys

#: architecture name -> stride of the latent whose spatial shape ``compress`` returns
ARCHITECTURES: dict[str, int] = {
    "bmshj2018-factorized": 16,
    "bmshj2018-factorized-relu": 16,
    "bmshj2018-hyperprior": 64,
    "mbt2018-mean": 64,
    "mbt2018": 64,
    "cheng2020-anchor": 64,
    "cheng2020-attn": 64,
}
_PAYLOAD = "intra payload"


class CompressAIIntraCodec:
    """A CompressAI image model behind the :class:`plvc.intra.IntraCodec` interface.

    Payload: ``pack_fields([H, W, latent h, latent w], strings)`` with the original
    image size, so images of any size are padded (replicate) to :attr:`stride` and
    cropped back.
    """

    name = "compressai"
    stride = 64

    def __init__(
        self,
        architecture: str = "bmshj2018-hyperprior",
        quality: int = 3,
        weights: str | None = None,
        weights_data: bytes | None = None,
        weights_sha256: str | None = None,
        seed: int = 0,
        allow_random_init: bool = False,
        device: str | torch.device = "cpu",
    ) -> None:
        if architecture not in ARCHITECTURES:
            raise IntraCodecError(
                f"unknown CompressAI architecture {architecture!r}; "
                f"choose one of {', '.join(ARCHITECTURES)}"
            )
        self.architecture = architecture
        self.quality = int(quality)
        if weights is None and weights_data is None and not allow_random_init:
            raise IntraCodecError(
                "the 'compressai' intra codec needs trained weights: set its 'weights' param "
                "to a state-dict file, or pass allow_random_init=True to code with an "
                "untrained, seeded model (tests and timing only)"
            )
        self.seed = int(seed)
        # a bundle's embedded bytes name no file: the codec's config then carries the digest only
        self.weights = str(weights) if weights is not None and weights_data is None else None
        self.trained = weights is not None or weights_data is not None
        self._latent_stride = ARCHITECTURES[architecture]
        # random init drawn from a private generator state: reproducible in any process
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            try:
                self.model = _zoo.image_models[architecture](quality=self.quality, pretrained=False)
            except (ValueError, KeyError) as exc:
                raise IntraCodecError(
                    f"CompressAI {architecture}: invalid quality {quality} ({exc})"
                ) from None
        if weights_data is not None:
            self.weights_sha256 = self._load_weights(bytes(weights_data), weights_sha256)
        elif weights is not None:
            self.weights_sha256 = self._load_weights(Path(weights), weights_sha256)
        else:
            self.weights_sha256 = None
        self.model.eval().requires_grad_(False)
        self.model.update(force=True)
        kind = type(self.model)
        self._family = (
            "factorized"
            if kind in (FactorizedPrior, FactorizedPriorReLU)
            else "scale"
            if kind is ScaleHyperprior
            else "mean-scale"
            if kind is MeanScaleHyperprior
            else "cpu-only"
        )
        # CPU copies of everything the entropy coder's tables depend on
        self._coding_parts = {
            name: copy.deepcopy(getattr(self.model, name)).cpu()
            for name in ("entropy_bottleneck", "gaussian_conditional", "h_s")
            if hasattr(self.model, name)
        }
        self.to(device)

    def _load_weights(self, path: Path | bytes, expected_sha256: str | None) -> str:
        """Load a state-dict file, or its bytes (a codec bundle's); returns its SHA-256."""
        if isinstance(path, bytes):
            name, source, digest = "(embedded)", io.BytesIO(path), hashlib.sha256(path).hexdigest()
        else:
            if not path.is_file():
                raise IntraCodecError(
                    f"intra codec weights {str(path)!r} (param 'weights') not found"
                )
            name, source, digest = repr(str(path)), path, file_sha256(path)
        if expected_sha256 is not None and digest != expected_sha256:
            raise IntraCodecError(
                f"intra codec weights {name} have SHA-256 {digest[:16]}..., the stream "
                f"was coded with {expected_sha256[:16]}...: a different file"
            )
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            self.model.load_state_dict(_rename_pretrained_keys(state))
        except Exception as exc:  # torch raises many types for a bad file
            raise IntraCodecError(
                f"intra codec weights {name} do not load into CompressAI "
                f"{self.architecture} quality {self.quality}: {exc}"
            ) from None
        return digest

    @property
    def config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this codec with ``get_intra_codec("compressai", ...)``.

        Unset options are left out: the config travels in every stream header.
        """
        config: dict[str, Any] = {"architecture": self.architecture, "quality": self.quality}
        if self.trained:
            if self.weights is not None:
                config["weights"] = self.weights
            config["weights_sha256"] = self.weights_sha256
        else:
            config["allow_random_init"] = True
            config["seed"] = self.seed
        return config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> CompressAIIntraCodec:
        """Move the transforms to ``device`` (autoregressive models stay on the CPU)."""
        self.model.to("cpu" if self._family == "cpu-only" else device)
        return self

    def _padded(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 3 or image.shape[0] != 3:
            raise IntraCodecError(
                f"intra codec expects an image [3, H, W], got {list(image.shape)}"
            )
        h, w = image.shape[-2:]
        ph, pw = -h % self.stride, -w % self.stride
        x = image.to(self.device, torch.float32).unsqueeze(0)
        return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x

    def _entropy_params(self, z_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scales (and means) of the Gaussian over y: the tables both sides must agree on."""
        params = self._coding_parts["h_s"](z_hat)
        if self._family == "mean-scale":
            scales, means = params.chunk(2, 1)
            return scales, means
        return params, None

    def encode(self, image: torch.Tensor) -> bytes:
        """Code a float image ``[3, H, W]`` in ``[0, 1]`` to bytes."""
        h, w = image.shape[-2:]
        x = self._padded(image)
        if self._family == "cpu-only":
            with deterministic_coding():
                out = self.model.compress(x)
            strings = [group[0] for group in out["strings"]]
            shape = [int(v) for v in out["shape"]]
            return pack_fields([h, w, *shape], strings)
        with torch.inference_mode():
            y = self.model.g_a(x)
            z = None
            if self._family != "factorized":
                z = self.model.h_a(torch.abs(y) if self._family == "scale" else y)
        y = y.float().cpu()
        eb = self._coding_parts["entropy_bottleneck"]
        with deterministic_coding():
            if z is None:
                return pack_fields([h, w, *y.shape[-2:]], [eb.compress(y)[0]])
            z = z.float().cpu()
            z_strings = eb.compress(z)
            z_hat = eb.decompress(z_strings, z.shape[-2:])
            scales, means = self._entropy_params(z_hat)
            gc = self._coding_parts["gaussian_conditional"]
            y_strings = gc.compress(y, gc.build_indexes(scales), means=means)
        return pack_fields([h, w, *z.shape[-2:]], [y_strings[0], z_strings[0]])

    def _padded_strings(self, strings: list[bytes], sh: int, sw: int) -> list[bytes]:
        """Guard CompressAI's unchecked rANS reads (see :func:`plvc.bitstream.pad_for_rans`)."""
        if self._family == "factorized":
            counts = [self.model.M * sh * sw]
        else:
            # y at 4x the hyper-latent's resolution, z with N channels
            counts = [self.model.M * 16 * sh * sw, self.model.N * sh * sw]
        return [pad_for_rans(s, n) for s, n in zip(strings, counts, strict=True)]

    def decode(self, data: bytes, expected_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Decode bytes from :meth:`encode` to a float image ``[3, H, W]`` in ``[0, 1]``
        (``expected_size``: see :meth:`plvc.intra.IntraCodec.decode`)."""
        ints, strings = unpack_fields(data, _PAYLOAD)
        if len(ints) != 4:
            raise BitstreamError(f"{_PAYLOAD}: expected 4 integers, found {len(ints)}")
        h, w, sh, sw = ints
        if not (0 < h <= MAX_DIMENSION and 0 < w <= MAX_DIMENSION):
            raise BitstreamError(f"{_PAYLOAD}: image size {w}x{h} out of range")
        check_payload_size(_PAYLOAD, (h, w), expected_size)
        ph, pw = (math.ceil(v / self.stride) * self.stride for v in (h, w))
        expected = (ph // self._latent_stride, pw // self._latent_stride)
        if (sh, sw) != expected:
            raise BitstreamError(
                f"{_PAYLOAD}: latent shape {(sh, sw)} does not match a {w}x{h} image "
                f"({expected} expected for {self.architecture})"
            )
        n_expected = 1 if self._family == "factorized" else 2
        if len(strings) != n_expected:
            raise BitstreamError(
                f"{_PAYLOAD}: {len(strings)} strings, {self.architecture} codes {n_expected}"
            )
        strings = self._padded_strings(strings, sh, sw)
        if self._family == "cpu-only":
            with deterministic_coding():
                x_hat = self.model.decompress([[s] for s in strings], (sh, sw))["x_hat"]
            return x_hat[0, :, :h, :w].clamp(0, 1).float()
        eb = self._coding_parts["entropy_bottleneck"]
        with deterministic_coding():
            if self._family == "factorized":
                y_hat = eb.decompress([strings[0]], (sh, sw))
            else:
                z_hat = eb.decompress([strings[1]], (sh, sw))
                scales, means = self._entropy_params(z_hat)
                gc = self._coding_parts["gaussian_conditional"]
                y_hat = gc.decompress([strings[0]], gc.build_indexes(scales), means=means)
        with torch.inference_mode():
            x_hat = self.model.g_s(y_hat.to(self.device))
        return x_hat[0, :, :h, :w].clamp(0, 1).float()

    def estimate_bits(self, image: torch.Tensor) -> float:
        """Rate the entropy model predicts for ``image``: ``sum(-log2 p)`` (no coder overhead)."""
        with torch.inference_mode():
            out = self.model(self._padded(image))
        return float(sum((-torch.log2(lik)).sum() for lik in out["likelihoods"].values()))


register_intra_codec("compressai", CompressAIIntraCodec)
