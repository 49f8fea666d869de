"""Whole-video coding: GOPs of one intra-coded frame followed by PLVC P-frames.

The first frame of every GOP is coded with an intra codec (:mod:`plvc.intra`; HiFiC in
the paper), the following ``gop - 1`` frames with the recurrent generator (paper eq. 3),
which carries its state from P-frame to P-frame and restarts at each I-frame. Frames
are padded (replicate, right/bottom) to a multiple of the generator's stride and cropped
back on decode. The encoder references exactly what the decoder will see: the decoded
I-frame and each P-frame's reconstruction from ``compress_pframe``, so a stream decodes
to the encoder's reconstruction bit for bit (same device type and PyTorch build, same
:class:`~plvc.determinism.CodingMode`, which the header records).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from plvc.bitstream import (
    FINGERPRINT_BYTES,
    INTRA_LOCAL_KEYS,
    FrameRecord,
    FrameType,
    StreamHeader,
    decode_container,
    encode_container,
    frame_type_for_index,
    pad_for_rans,
)
from plvc.determinism import CodingMode
from plvc.errors import BitstreamError, IntraCodecError, PLVCError, WeightsError
from plvc.intra import IntraCodec, get_intra_codec

if TYPE_CHECKING:
    from plvc.generator import PLVC, GeneratorState

__all__ = [
    "EncodeResult",
    "FrameStats",
    "VideoDecoder",
    "VideoEncoder",
    "coding_environment",
    "decode_video",
    "encode_video",
    "intra_fingerprint",
    "intra_spec",
    "iter_decode",
    "model_fingerprint",
    "stream_intra_config",
]

Frame = torch.Tensor | np.ndarray


def model_fingerprint(model: PLVC) -> bytes:
    """First bytes of SHA-256 over the config and every state-dict tensor (CDF tables too).

    Stored in the stream header so that decoding with other weights fails with a clear
    message instead of producing garbage.
    """
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        digest.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.digest()[:FINGERPRINT_BYTES]


def intra_spec(intra: IntraCodec) -> tuple[str, dict[str, Any]]:
    """``(name, config)`` that rebuild ``intra`` via ``get_intra_codec(name, **config)``."""
    config = getattr(intra, "config", None)
    if callable(config):
        config = config()
    if not isinstance(config, dict):
        raise IntraCodecError(
            f"intra codec {intra.name!r} has no 'config' dict: a decoder could not rebuild it"
        )
    try:
        json.dumps(config)
    except (TypeError, ValueError) as exc:
        raise IntraCodecError(f"intra codec {intra.name!r} config is not JSON: {exc}") from None
    return intra.name, config


def intra_fingerprint(intra: IntraCodec) -> bytes:
    """First bytes of the SHA-256 of the intra codec's weights file (its ``weights_sha256``);
    zeros for a codec without trained weights. Stored in the stream header in place of any
    path, so a decoder checks that its intra codec is the encoder's."""
    digest = intra_spec(intra)[1].get("weights_sha256")
    if digest is None:
        return bytes(FINGERPRINT_BYTES)
    try:
        raw = bytes.fromhex(str(digest))
    except ValueError:
        raw = b""
    if len(raw) < FINGERPRINT_BYTES:
        raise IntraCodecError(f"intra codec {intra.name!r}: weights_sha256 {digest!r} is no digest")
    return raw[:FINGERPRINT_BYTES]


def _stream_config(config: dict[str, Any]) -> dict[str, Any]:
    """The intra config as a stream carries it: without a file path or the file's digest."""
    return {k: v for k, v in config.items() if k not in INTRA_LOCAL_KEYS}


@dataclass(frozen=True)
class FrameStats:
    """Rate of one coded frame: bytes in the stream vs the entropy model's estimate."""

    index: int
    frame_type: str
    payload_bytes: int
    """Entropy-coded bytes of the frame (container framing excluded)."""
    estimated_bits: float | None = None
    """``sum(-log2 p)`` of the coded latents under the model, when requested."""
    seconds: float | None = None
    """Wall time the encoder spent on the frame (the rate estimate excluded)."""

    @property
    def bits(self) -> int:
        return 8 * self.payload_bytes


@dataclass
class EncodeResult:
    """A coded video: the stream bytes, per-frame statistics and (optionally) the
    encoder-side reconstruction ``[T, 3, H, W]`` (CPU float, what a decoder will output)."""

    data: bytes
    header: StreamHeader
    frame_stats: list[FrameStats]
    reconstruction: torch.Tensor | None = None

    def __bytes__(self) -> bytes:
        return self.data

    @property
    def num_pixels(self) -> int:
        return self.header.frame_count * self.header.width * self.header.height

    @property
    def bpp(self) -> float:
        """Bits per pixel of the whole stream (header and framing included, DESIGN §5)."""
        return 8 * len(self.data) / self.num_pixels

    @property
    def payload_bpp(self) -> float:
        """Bits per pixel of the entropy-coded payload only."""
        return sum(s.bits for s in self.frame_stats) / self.num_pixels

    @property
    def estimated_bpp(self) -> float | None:
        """The model's estimate, where every frame has one."""
        if any(s.estimated_bits is None for s in self.frame_stats):
            return None
        return sum(s.estimated_bits or 0.0 for s in self.frame_stats) / self.num_pixels


@contextlib.contextmanager
def coding_environment(device: torch.device, cpu_threads: int) -> Iterator[None]:
    """Fix what the reconstruction's rounding depends on, for one frame's coding.

    CPU convolutions give different last bits for each intra-op thread count, so the
    encoder records its count in the header and a CPU decoder uses the same one. On
    CUDA, cuDNN is asked for deterministic algorithms (no autotuning). Process-global
    settings, restored on exit.
    """
    if device.type == "cpu":
        previous = torch.get_num_threads()
        torch.set_num_threads(cpu_threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)
    elif device.type == "cuda":
        cudnn = torch.backends.cudnn
        previous_flags = (cudnn.deterministic, cudnn.benchmark)
        cudnn.deterministic, cudnn.benchmark = True, False
        try:
            yield
        finally:
            cudnn.deterministic, cudnn.benchmark = previous_flags
    else:
        yield


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _as_frame_tensor(frame: Frame, index: int) -> torch.Tensor:
    """One frame as float ``[3, H, W]`` in [0, 1] from a tensor or an RGB uint8 array."""
    if isinstance(frame, np.ndarray):
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise PLVCError(
                f"frame {index}: arrays must be RGB uint8 [H, W, 3], got {frame.dtype} "
                f"{list(frame.shape)}"
            )
        return torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).float() / 255.0
    if isinstance(frame, torch.Tensor):
        if frame.dim() == 4 and frame.shape[0] == 1:
            frame = frame[0]
        if frame.dim() != 3 or frame.shape[0] != 3 or not frame.is_floating_point():
            raise PLVCError(
                f"frame {index}: tensors must be float [3, H, W] in [0, 1], got {frame.dtype} "
                f"{list(frame.shape)}"
            )
        return frame.float()
    raise PLVCError(f"frame {index}: expected a tensor or numpy array, got {type(frame).__name__}")


def _iter_frames(frames: torch.Tensor | np.ndarray | Iterable[Frame]) -> Iterator[Frame]:
    if isinstance(frames, torch.Tensor):
        if frames.dim() != 4:
            raise PLVCError(f"a video tensor must be [T, 3, H, W], got {list(frames.shape)}")
        return iter(frames.unbind(0))
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4:
            raise PLVCError(f"a video array must be [T, H, W, 3], got {list(frames.shape)}")
        return iter(frames)
    return iter(frames)


def _pad_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    ph, pw = height - x.shape[-2], width - x.shape[-1]
    if not (ph or pw):
        return x
    if x.dim() == 3:
        return F.pad(x[None], (0, pw, 0, ph), mode="replicate")[0]
    return F.pad(x, (0, pw, 0, ph), mode="replicate")


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _intra_stride(intra: IntraCodec) -> int:
    stride = int(getattr(intra, "stride", 1) or 1)
    if stride < 1:
        raise IntraCodecError(f"intra codec {intra.name!r} has invalid stride {stride}")
    return stride


def _intra_roundtrip_size(header: StreamHeader, intra: IntraCodec) -> tuple[int, int]:
    stride = _intra_stride(intra)
    return _round_up(header.coded_height, stride), _round_up(header.coded_width, stride)


class VideoEncoder:
    """Frame-by-frame encoder; :meth:`finish` returns the container bytes.

    Frames are float ``[3, H, W]`` in [0, 1] or RGB ``uint8 [H, W, 3]`` arrays, all of
    the size given at construction.
    """

    def __init__(
        self,
        model: PLVC,
        intra: IntraCodec,
        *,
        width: int,
        height: int,
        gop: int = 9,
        quality: str = "",
        fps: Fraction | None = None,
        estimate_bits: bool = False,
        num_threads: int | None = None,
        mode: CodingMode | None = None,
    ) -> None:
        if gop != -1 and gop < 1:
            raise PLVCError(f"GOP must be -1 (one I-frame) or >= 1, got {gop}")
        self.model, self.intra = model, intra
        self.gop, self.quality, self.estimate_bits = gop, quality, estimate_bits
        self.width, self.height = width, height
        self.fps = Fraction(fps) if fps is not None else None
        self.intra_name, config = intra_spec(intra)
        self.intra_config = _stream_config(config)
        self.intra_fingerprint = intra_fingerprint(intra)
        self.pad_multiple = int(getattr(model, "stride", 16))
        self.device = _model_device(model)
        # 0 in the header: the reconstruction path ran on an accelerator
        self.cpu_threads = (
            (num_threads or torch.get_num_threads()) if self.device.type == "cpu" else 0
        )
        self.fingerprint = model_fingerprint(model)
        self.mode = mode if mode is not None else CodingMode()
        if not isinstance(self.mode, CodingMode):
            raise PLVCError(f"mode must be a CodingMode, got {type(self.mode).__name__}")
        self.records: list[FrameRecord] = []
        self.stats: list[FrameStats] = []
        self._ref: torch.Tensor | None = None
        self._state: GeneratorState | None = None
        # a header for the sizes alone; frame count and the rest are filled in finish()
        self._sizes = self._header(frame_count=1)

    def _header(self, frame_count: int) -> StreamHeader:
        fps = (self.fps.numerator, self.fps.denominator) if self.fps is not None else None
        return StreamHeader(
            width=self.width,
            height=self.height,
            frame_count=frame_count,
            gop=self.gop,
            pad_multiple=self.pad_multiple,
            quality=self.quality,
            intra_name=self.intra_name,
            intra_config=self.intra_config,
            model_fingerprint=self.fingerprint,
            intra_fingerprint=self.intra_fingerprint,
            fps=fps,
            cpu_threads=self.cpu_threads,
            coding_mode=self.mode,
        )

    def encode_frame(self, frame: Frame) -> tuple[FrameStats, torch.Tensor]:
        """Code the next frame; returns its stats and reconstruction ``[3, H, W]`` (CPU)."""
        with coding_environment(self.device, self.cpu_threads), torch.inference_mode():
            return self._encode_frame(frame)

    def _encode_frame(self, frame: Frame) -> tuple[FrameStats, torch.Tensor]:
        start = time.perf_counter()
        index = len(self.records)
        x = _as_frame_tensor(frame, index)
        if tuple(x.shape[-2:]) != (self.height, self.width):
            raise PLVCError(
                f"frame {index} is {x.shape[-1]}x{x.shape[-2]}, the video is "
                f"{self.width}x{self.height}"
            )
        coded_h, coded_w = self._sizes.coded_height, self._sizes.coded_width
        x = _pad_to(x.to(self.device), coded_h, coded_w)
        estimated: float | None = None
        if frame_type_for_index(index, self.gop) is FrameType.I:
            ih, iw = _intra_roundtrip_size(self._sizes, self.intra)
            x_intra = _pad_to(x, ih, iw)
            payload = self.intra.encode(x_intra)
            x_hat = self.intra.decode(payload)[:, :coded_h, :coded_w].to(self.device)[None]
            if self.estimate_bits and hasattr(self.intra, "estimate_bits"):
                estimated = float(self.intra.estimate_bits(x_intra))
            record = FrameRecord(FrameType.I, (payload,))
            self._state = None
        else:
            assert self._ref is not None
            x = x[None]
            if self.estimate_bits:
                from plvc.entropy import bits_from_likelihoods

                tick = time.perf_counter()
                training = self.model.training
                self.model.eval()
                try:
                    out = self.model.forward_pframe(x, self._ref, self._state)
                finally:
                    self.model.train(training)
                estimated = float(bits_from_likelihoods(out["likelihoods"]))
                start += time.perf_counter() - tick
            strings, shape, x_hat, self._state = self.model.compress_pframe(
                x, self._ref, self._state, self.mode
            )
            record = FrameRecord(FrameType.P, tuple(strings), (int(shape[0]), int(shape[1])))
        self._ref = x_hat
        self.records.append(record)
        output = x_hat[0, :, : self.height, : self.width].float().cpu()
        seconds = time.perf_counter() - start
        stats = FrameStats(
            index, record.frame_type.name, record.payload_bytes, estimated, seconds=seconds
        )
        self.stats.append(stats)
        return stats, output

    @property
    def header(self) -> StreamHeader:
        """The header of the frames coded so far."""
        return self._header(max(len(self.records), 1))

    def finish(self) -> bytes:
        """The complete stream."""
        if not self.records:
            raise PLVCError("no frames to encode")
        return encode_container(self.header, self.records)


def encode_video(
    frames: torch.Tensor | np.ndarray | Iterable[Frame],
    model: PLVC,
    intra: IntraCodec,
    *,
    gop: int = 9,
    quality: str = "",
    fps: Fraction | None = None,
    estimate_bits: bool = False,
    return_reconstruction: bool = False,
    num_threads: int | None = None,
    mode: CodingMode | None = None,
) -> EncodeResult:
    """Code a video: ``[T, 3, H, W]`` float tensor, ``[T, H, W, 3]`` uint8 array, or an
    iterable of frames. ``gop``: I-frame period (-1: only the first frame is intra).
    ``estimate_bits``: also run the model's rate estimate per frame (one extra forward
    pass per frame) so the stats show the gap between estimated and actual bits.
    ``num_threads``: CPU intra-op threads for coding (default: torch's current count),
    recorded in the header so that decoders reproduce the reconstruction exactly.
    ``mode``: how the networks run (:class:`~plvc.determinism.CodingMode`; default
    portable entropy parameters, float32, channels-last), also recorded in the header.
    """
    iterator = _iter_frames(frames)
    try:
        first = _as_frame_tensor(next(iterator), 0)
    except StopIteration:
        raise PLVCError("no frames to encode") from None
    encoder = VideoEncoder(
        model,
        intra,
        width=int(first.shape[-1]),
        height=int(first.shape[-2]),
        gop=gop,
        quality=quality,
        fps=fps,
        estimate_bits=estimate_bits,
        num_threads=num_threads,
        mode=mode,
    )
    reconstruction = []
    for frame in _chain(first, iterator):
        _, x_hat = encoder.encode_frame(frame)
        if return_reconstruction:
            reconstruction.append(x_hat)
    data = encoder.finish()
    return EncodeResult(
        data=data,
        header=encoder.header,
        frame_stats=list(encoder.stats),
        reconstruction=torch.stack(reconstruction) if return_reconstruction else None,
    )


def _chain(first: Frame, rest: Iterator[Frame]) -> Iterator[Frame]:
    yield first
    yield from rest


# ---------------------------------------------------------------------------------------
# decoding


def stream_intra_config(
    header: StreamHeader, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The intra codec's config to decode ``header``'s stream with: the stream's, updated by
    the caller's ``overrides``.

    A stream is data, not instructions. It names no weights file (the caller gives one: the
    codec bundle's embedded weights, or ``overrides={"weights": ...}``, whose digest must match
    the stream's intra fingerprint), and it may not ask for a randomly initialised intra
    codec (its frames would decode to garbage without a word) unless the caller allows that
    explicitly (``{"allow_random_init": True}``).
    """
    overrides = dict(overrides or {})
    config = dict(header.intra_config)
    if config.get("allow_random_init") and not overrides.get("allow_random_init"):
        raise IntraCodecError(
            "the stream asks for a randomly initialised intra codec (a smoke-test stream); "
            "a decoder builds one only when told to: intra_overrides="
            "{'allow_random_init': True} (plvc decode --intra-config "
            "'{\"allow_random_init\": true}')"
        )
    trained = any(header.intra_fingerprint)
    if trained and not any(key in overrides for key in ("weights", "weights_data")):
        raise IntraCodecError(
            f"the stream's I-frames need the {header.intra_name!r} intra codec with fingerprint "
            f"{header.intra_fingerprint.hex()}; a stream never names a file: decode with the "
            "codec bundle (plvc decode --weights BUNDLE) or give the intra weights "
            "(intra_overrides={'weights': ...}, plvc decode --intra-weights FILE)"
        )
    return {**config, **overrides}


class VideoDecoder:
    """Decodes a parsed stream frame by frame; iterate for float ``[3, H, W]`` CPU frames.

    The networks run as the header's :class:`~plvc.determinism.CodingMode` says, on the
    stream's CPU thread count, which reproduces the encoder's reconstruction bit for bit.
    ``num_threads`` may choose another count for a stream with portable or exact entropy
    parameters: its latents decode identically (they never depend on the thread count);
    the pictures may then differ from the encoder's in the last bits.
    """

    def __init__(
        self,
        data: bytes,
        model: PLVC,
        *,
        intra: IntraCodec | None = None,
        intra_overrides: dict[str, Any] | None = None,
        check_fingerprint: bool = True,
        num_threads: int | None = None,
    ) -> None:
        self.header, self.records = decode_container(data)
        self.model = model
        if check_fingerprint and model_fingerprint(model) != self.header.model_fingerprint:
            raise WeightsError(
                "the stream was encoded with other generator weights (model fingerprint "
                f"{self.header.model_fingerprint.hex()}, these weights give "
                f"{model_fingerprint(model).hex()}): pass the weights file used to encode it"
            )
        if intra is None:
            config = stream_intra_config(self.header, intra_overrides)
            try:
                intra = get_intra_codec(self.header.intra_name, **config)
            except TypeError as exc:
                raise IntraCodecError(
                    f"intra codec {self.header.intra_name!r} rejects the stream's config "
                    f"{config}: {exc}"
                ) from None
        elif intra.name != self.header.intra_name:
            raise IntraCodecError(
                f"stream needs intra codec {self.header.intra_name!r}, got {intra.name!r}"
            )
        intra_config = _stream_config(intra_spec(intra)[1])
        if intra_config != self.header.intra_config:
            raise IntraCodecError(
                f"the stream's intra codec config {self.header.intra_config} is not this "
                f"{intra.name!r} codec's {intra_config}: use the codec bundle it was encoded with"
            )
        if intra_fingerprint(intra) != self.header.intra_fingerprint:
            raise IntraCodecError(
                f"the stream was encoded with another {self.header.intra_name!r} intra codec "
                f"(intra fingerprint {self.header.intra_fingerprint.hex()}, this one gives "
                f"{intra_fingerprint(intra).hex()}): use the codec bundle it was encoded with"
            )
        self.intra = intra
        self.device = _model_device(model)
        self.num_threads = self._thread_count(num_threads)
        self._latent_channels = int(model.config.latent_channels)
        self._check_records()

    def _thread_count(self, num_threads: int | None) -> int:
        """The stream's CPU thread count, or the caller's where the latents allow it."""
        stream = self.header.cpu_threads or torch.get_num_threads()
        if num_threads is None or num_threads == stream:
            return stream
        if num_threads < 1:
            raise PLVCError(f"num_threads must be >= 1, got {num_threads}")
        if self.device.type == "cpu" and self.header.coding_mode.entropy_parameters == "device":
            raise PLVCError(
                f"the stream's entropy parameters ran on the encoder's device with "
                f"{stream} CPU threads ({self.header.coding_mode.describe()}); decoding its "
                f"latents needs the same count, not {num_threads}"
            )
        return num_threads

    def _check_records(self) -> None:
        """Every record's sizes against what the header and the model imply, before anything
        is decoded: a forged latent size must not make the decoder allocate for it."""
        coded_h, coded_w = self.header.coded_height, self.header.coded_width
        stride = int(self.model.stride)
        if coded_h % stride or coded_w % stride:
            raise BitstreamError(
                f"coded size {coded_w}x{coded_h} is not a multiple of the model's stride {stride}"
            )
        latent = (coded_h // stride, coded_w // stride)
        for index, record in enumerate(self.records):
            if record.frame_type is FrameType.I:
                if len(record.strings) != 1:
                    raise BitstreamError(
                        f"frame {index}: an I-frame has one intra payload, found "
                        f"{len(record.strings)} strings"
                    )
                continue
            if len(record.strings) != 2:
                raise BitstreamError(
                    f"frame {index}: a P-frame has two strings (motion, residual), found "
                    f"{len(record.strings)}"
                )
            if record.shape is None or tuple(record.shape) != latent:
                raise BitstreamError(
                    f"frame {index}: latent size {record.shape} does not match the "
                    f"{coded_w}x{coded_h} coded frame (expected {latent})"
                )

    def __len__(self) -> int:
        return self.header.frame_count

    def __iter__(self) -> Iterator[torch.Tensor]:
        h, w = self.header.height, self.header.width
        threads = self.num_threads
        ref: torch.Tensor | None = None
        state: GeneratorState | None = None
        for index, record in enumerate(self.records):
            try:
                with coding_environment(self.device, threads), torch.inference_mode():
                    ref, state = self._decode_frame(record, ref, state)
            except BitstreamError as exc:
                raise BitstreamError(f"frame {index}: {exc}") from None
            except (ValueError, RuntimeError) as exc:
                # entropy decoders reject inconsistent payloads with ValueError/RuntimeError
                raise BitstreamError(f"frame {index} cannot be decoded: {exc}") from None
            yield ref[0, :, :h, :w].float().cpu()

    def _decode_frame(
        self, record: FrameRecord, ref: torch.Tensor | None, state: GeneratorState | None
    ) -> tuple[torch.Tensor, GeneratorState | None]:
        coded_h, coded_w = self.header.coded_height, self.header.coded_width
        if record.frame_type is FrameType.I:
            ih, iw = _intra_roundtrip_size(self.header, self.intra)
            image = self.intra.decode(record.strings[0], expected_size=(ih, iw))
            if tuple(image.shape) != (3, ih, iw):
                raise BitstreamError(
                    f"I-frame decodes to {list(image.shape)}, expected [3, {ih}, {iw}]"
                )
            return image[:, :coded_h, :coded_w].to(self.device)[None], None
        assert ref is not None and record.shape is not None
        symbols = self._latent_channels * record.shape[0] * record.shape[1]
        strings = [pad_for_rans(s, symbols) for s in record.strings]
        return self.model.decompress_pframe(
            strings, record.shape, ref, state, self.header.coding_mode
        )


def _load_codec(
    weights: str | os.PathLike[str] | None,
    model: PLVC | None,
    intra: IntraCodec | None,
    intra_overrides: dict[str, Any] | None,
    device: str | None,
) -> tuple[PLVC, IntraCodec | None]:
    """The generator, and the intra codec of the bundle at ``weights`` unless the caller
    gives one (``intra``, or intra weights through ``intra_overrides``)."""
    if model is not None:
        return model, intra
    if weights is None:
        raise PLVCError("decoding needs a model or a codec bundle (weights file)")
    from plvc.weights import load_codec, load_weights

    own_intra = intra is not None or any(
        key in (intra_overrides or {}) for key in ("weights", "weights_data", "allow_random_init")
    )
    if own_intra:
        loaded, _ = load_weights(weights, map_location=device or "cpu")
        return loaded, intra
    bundle = load_codec(weights, device=device or "cpu")
    return bundle.model, bundle.intra


def iter_decode(
    data: bytes,
    model: PLVC | None = None,
    *,
    weights: str | os.PathLike[str] | None = None,
    intra: IntraCodec | None = None,
    intra_overrides: dict[str, Any] | None = None,
    device: str | None = None,
) -> Iterator[torch.Tensor]:
    """Yield decoded frames ``[3, H, W]`` one at a time (see :func:`decode_video`)."""
    model, intra = _load_codec(weights, model, intra, intra_overrides, device)
    decoder = VideoDecoder(data, model, intra=intra, intra_overrides=intra_overrides)
    return iter(decoder)


def decode_video(
    data: bytes,
    model: PLVC | None = None,
    *,
    weights: str | os.PathLike[str] | None = None,
    intra: IntraCodec | None = None,
    intra_overrides: dict[str, Any] | None = None,
    device: str | None = None,
) -> torch.Tensor:
    """Decode a stream to float frames ``[T, 3, H, W]`` in [0, 1] (CPU).

    The generator comes from ``model`` or a codec bundle (``weights``), the intra codec from
    ``intra``, else the bundle, else the header's name and config updated by
    ``intra_overrides`` (e.g. ``{"weights": path}`` of a separate intra weights file). The
    intra codec's fingerprint must be the stream's.
    """
    frames = list(
        iter_decode(
            data,
            model,
            weights=weights,
            intra=intra,
            intra_overrides=intra_overrides,
            device=device,
        )
    )
    return torch.stack(frames)
