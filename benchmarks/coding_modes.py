"""What each coding mode costs in quality and rate: real bitstreams of a trained model.

    .venv/bin/python -m benchmarks.coding_modes [--model paper] [--steps 300] [--quality high]
        [--modes legacy,default,device,exact,bf16] [--threads 2]

:class:`plvc.determinism.CodingMode` changes how the networks round (memory format, bf16
autocast) and where the entropy parameters are computed. This trains a single-P model in
float32 (``benchmarks.bf16_gap``'s training: eq. 4 at ``qualities.<quality>.lmbda``, the
sample videos at 256x448, 128² crops) and then codes every held-out frame pair as a
two-frame stream (``plvc.codec.encode_video``, GOP 2) in each mode, decodes it back, and
reports the P-frame's PSNR (8-bit RGB) and its payload bpp. The I-frame is the original frame
(a lossless PNG intra codec registered here), so only the P-frame codec is measured, as in
``bf16_gap``. With GOP 2 the first P-frame's factorized prior codes both latents: the RPM
modes (portable, device, exact) differ only where the RPM runs, which ``tests/plvc/test_exact.py``
covers (the exact RPM picks the float RPM's CDF for >99.9% of the symbols).
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import cv2
import numpy as np
import torch

from benchmarks.bf16_gap import (
    HEIGHT,
    WIDTH,
    add_training_arguments,
    read_pairs,
    single_p_phase,
    train,
)
from benchmarks.codec_speed import MODES
from pipeline.config import load_params, with_every_quality
from plvc.bitstream import decode_container
from plvc.codec import decode_video, encode_video
from plvc.errors import BitstreamError
from plvc.intra import get_intra_codec, register_intra_codec


class PngIntraCodec:
    """Lossless I-frames (8-bit PNG): the P-frame codec is measured alone."""

    name = "png-benchmark"
    stride = 1

    def __init__(self) -> None:
        self.config: dict[str, str] = {}

    def encode(self, image: torch.Tensor) -> bytes:
        pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        ok, data = cv2.imencode(".png", np.ascontiguousarray(pixels[..., ::-1]))
        if not ok:
            raise BitstreamError("PNG encoding failed")
        return data.tobytes()

    def decode(self, data: bytes, expected_size: tuple[int, int] | None = None) -> torch.Tensor:
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(255)


register_intra_codec(PngIntraCodec.name, PngIntraCodec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_training_arguments(parser, model="paper")
    parser.add_argument("--modes", default="legacy,default,device,exact,bf16")
    args = parser.parse_args()
    args.every = args.steps
    torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    lmbda = float(with_every_quality(load_params(args.params)).qualities[args.quality].lmbda)  # type: ignore[index]
    pairs, heldout_pairs = read_pairs(args.frames)
    phase = single_p_phase(args, lmbda)
    print(
        f"{len(pairs)} train pairs, {len(heldout_pairs)} held-out pairs ({WIDTH}x{HEIGHT}); "
        f"training {args.model} single-P for {args.steps} steps at λ = {lmbda:g}",
        flush=True,
    )
    torch.manual_seed(args.seed)
    initial = copy.deepcopy(phase.build_models().generator.state_dict())
    _, model = train(phase, initial, pairs, heldout_pairs, args, bf16=False)
    model.eval()
    model.update(force=True)
    intra = get_intra_codec(PngIntraCodec.name)

    print(
        f"\n{len(heldout_pairs)} held-out pairs ({WIDTH}x{HEIGHT}), {args.model} single-P "
        f"trained {args.steps} steps at λ = {lmbda:g}; P-frame of each two-frame stream:"
    )
    print("| mode | P-frame bpp | P-frame PSNR | encode + decode s | decoded = encoder's |")
    print("|---|---|---|---|---|")
    for name in modes:
        rates, errors, exact, start = [], [], True, time.perf_counter()
        for pair in heldout_pairs:
            frames = torch.from_numpy(pair).permute(0, 3, 1, 2).float().div(255)
            result = encode_video(
                frames, model, intra, gop=2, mode=MODES[name], return_reconstruction=True
            )
            _, records = decode_container(result.data)
            rates.append(8 * records[1].payload_bytes / (HEIGHT * WIDTH))
            decoded = decode_video(result.data, model, intra=intra)
            exact &= torch.equal(decoded, result.reconstruction)
            x_hat = (decoded[1] * 255).round() / 255
            errors.append(float((x_hat - frames[1]).pow(2).mean()))
        seconds = time.perf_counter() - start
        psnr = float(np.mean([-10 * math.log10(max(e, 1e-12)) for e in errors]))
        print(
            f"| {name} | {np.mean(rates):.4f} | {psnr:.3f} dB | {seconds:.0f} | {exact} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
