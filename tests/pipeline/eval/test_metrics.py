"""Quality metrics: exact formulas, identities, flicker, backbones and their errors."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torchvision

from pipeline.backbones import MissingWeightsError, default_alexnet_path, default_inception_path
from pipeline.backbones import load_inception as _load_inception
from pipeline.eval.metrics import (
    RANDOM_SUFFIX,
    EvaluationError,
    MetricConfig,
    MetricSet,
    _hific_patches,
    bits_per_pixel,
    frechet_distance,
    from_json_safe,
    json_safe,
    ms_ssim,
    ms_ssim_scales,
)


def smooth_video(t: int = 5, h: int = 48, w: int = 64, seed: int = 0) -> torch.Tensor:
    """A panning smooth texture: consecutive frames differ, as in real video."""
    g = torch.Generator().manual_seed(seed)
    big = torch.rand(1, 3, h // 4, (w + 4 * t) // 4, generator=g)
    big = torch.nn.functional.interpolate(big, size=(h, w + 4 * t), mode="bicubic").clamp(0, 1)
    return torch.cat([big[:, :, :, 4 * i : 4 * i + w] for i in range(t)])


def random_set(metrics: tuple[str, ...]) -> MetricSet:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MetricSet(MetricConfig(metrics=metrics, allow_random_backbone=True))


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test may pick up weights a developer happens to have in ~/.cache/torch."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    return hub


@pytest.fixture(scope="module")
def lpips_random() -> MetricSet:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.hub, "get_dir", lambda: "/nonexistent-hub")
        return random_set(("psnr_rgb", "psnr_y", "ms_ssim", "lpips", "tdiff_mae", "tlp"))


def test_bpp_is_bytes_times_8_over_pixels() -> None:
    assert bits_per_pixel(1234, 3, 64, 96) == 1234 * 8 / (3 * 64 * 96)
    streams = [b"\x00" * 100, b"\x01" * 23, 7]
    assert bits_per_pixel(streams, 2, 16, 32) == 130 * 8 / (2 * 16 * 32)
    with pytest.raises(EvaluationError, match="positive frames"):
        bits_per_pixel(10, 0, 16, 16)


def test_psnr_of_known_mse_matches_formula() -> None:
    x = smooth_video()
    offset = 10 / 255  # on the 8-bit grid: quantisation leaves it exact away from 0 and 1
    x = x.mul(255).round().clamp(20, 230).div(255)
    x_hat = x + offset
    result = MetricSet(MetricConfig(metrics=("psnr_rgb", "psnr_y"))).evaluate(x, x_hat)
    expected = 10 * math.log10(1 / offset**2)
    for row in result.rows:
        assert row["psnr_rgb"] == pytest.approx(expected, abs=1e-6)  # float32 frames
        # luma of a uniform +10 on R, G and B is +10 x 219/255 in 8-bit units
        assert row["psnr_y"] == pytest.approx(
            10 * math.log10(255**2 / (10 * 219 / 255) ** 2), abs=1e-6
        )
    assert result.summary["psnr_rgb"] == pytest.approx(expected, abs=1e-6)


def test_identical_frames_give_inf_psnr_one_msssim_zero_lpips(lpips_random: MetricSet) -> None:
    x = smooth_video()
    result = lpips_random.evaluate(x, x.clone(), video="same", num_bytes=321)
    s = result.summary
    assert s["psnr_rgb"] == math.inf and s["psnr_y"] == math.inf
    assert s["ms_ssim"] == pytest.approx(1.0, abs=1e-12)
    assert s["lpips" + RANDOM_SUFFIX] == 0.0
    assert s["tdiff_mae"] == 0.0 and s["tlp" + RANDOM_SUFFIX] == 0.0
    assert "lpips" not in s and s["random_backbones"] == ["lpips"]
    assert s["bpp"] == bits_per_pixel(321, *x.shape[:1], *x.shape[2:])
    assert all(row["psnr_rgb"] == math.inf for row in result.rows)
    assert [r["frame"] for r in result.rows] == list(range(x.shape[0]))
    assert math.isnan(result.rows[0]["tdiff_mae"])  # no previous frame
    # strict JSON (no Infinity/NaN tokens), and back
    text = json.dumps(json_safe({"summary": s, "rows": result.rows}), allow_nan=False)
    back = from_json_safe(json.loads(text))
    assert back["summary"]["psnr_rgb"] == math.inf and back["rows"][0]["tdiff_mae"] is None


def test_distortion_lowers_scores(lpips_random: MetricSet) -> None:
    x = smooth_video()
    noisy = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(
        0, 1
    )
    s = lpips_random.evaluate(x, noisy).summary
    assert 20 < s["psnr_rgb"] < 35
    assert 0 < s["ms_ssim"] < 1
    assert s["lpips" + RANDOM_SUFFIX] > 0


def test_temporal_measures_are_zero_without_flicker_and_grow_with_it(
    lpips_random: MetricSet,
) -> None:
    x = smooth_video(t=6)
    sign = torch.tensor([(-1.0) ** i for i in range(6)]).view(-1, 1, 1, 1)

    def flicker(amplitude: float) -> dict:
        return lpips_random.evaluate(x, (x + amplitude * sign).clamp(0, 1)).summary

    steady = lpips_random.evaluate(x, (x + 0.04).clamp(0, 1)).summary
    weak, strong = flicker(0.02), flicker(0.08)
    # a constant error is distortion, not flicker: the temporal difference barely moves
    assert steady["tdiff_mae"] < 0.2 * weak["tdiff_mae"]
    assert 0 < weak["tdiff_mae"] < strong["tdiff_mae"]
    assert weak["tdiff_mae"] == pytest.approx(2 * 0.02 * 255, rel=0.15)
    assert 0 < weak["tlp" + RANDOM_SUFFIX] < strong["tlp" + RANDOM_SUFFIX]


def test_ms_ssim_scales_shrink_for_small_frames_and_are_flagged() -> None:
    assert ms_ssim_scales(256, 448) == 5
    assert ms_ssim_scales(176, 176) == 5
    assert ms_ssim_scales(170, 400) == 4  # torchmetrics wants side // 16 > 10
    assert ms_ssim_scales(144, 176) == 4  # CIF, like carphone
    assert ms_ssim_scales(48, 64) == 3
    assert ms_ssim_scales(10, 64) == 0
    with pytest.raises(EvaluationError, match="too small"):
        ms_ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    x = smooth_video(t=2, h=48, w=64)
    result = MetricSet(MetricConfig(metrics=("ms_ssim",))).evaluate(x, x * 0.9)
    assert result.rows[0]["ms_ssim_scales"] == 3
    assert result.summary["ms_ssim_reduced_scales"] is True
    assert result.summary["ms_ssim_scales_min"] == 3


def test_ms_ssim_agrees_with_pytorch_msssim_at_five_scales() -> None:
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    x = smooth_video(t=2, h=176, w=192)
    y = (x + 0.06 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    ours = ms_ssim(x, y)
    theirs = pytorch_msssim.ms_ssim(x, y, data_range=1.0, size_average=False).double()
    assert torch.allclose(ours, theirs, atol=2e-3)


def test_missing_weights_name_the_param(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match=r"evaluate\.lpips_backbone"):
        MetricSet(MetricConfig(metrics=("lpips",), lpips_backbone=tmp_path / "nope.pth"))
    with pytest.raises(MissingWeightsError, match=r"evaluate\.inception_weights"):
        MetricSet(MetricConfig(metrics=("fid",), inception_weights=tmp_path / "nope.pth"))
    # nothing given and nothing cached: the error says which param to set
    with pytest.raises(MissingWeightsError, match=r"evaluate\.lpips_backbone"):
        MetricSet(MetricConfig(metrics=("tlp",)))
    with pytest.raises(MissingWeightsError, match=r"evaluate\.inception_weights"):
        MetricSet(MetricConfig(metrics=("kid",)))
    # an explicit path is never silently replaced by a random backbone
    with pytest.raises(MissingWeightsError, match=r"evaluate\.lpips_backbone"):
        MetricSet(
            MetricConfig(
                metrics=("lpips",), lpips_backbone=tmp_path / "x", allow_random_backbone=True
            )
        )
    # metrics that need no backbone still run
    MetricSet(MetricConfig(metrics=("psnr_rgb", "ms_ssim", "tdiff_mae")))


def test_unknown_metric_and_bad_frames_are_named() -> None:
    with pytest.raises(EvaluationError, match="unknown metric"):
        MetricConfig(metrics=("psnr", "lpips"))
    metric_set = MetricSet(MetricConfig(metrics=("psnr_rgb",)))
    with pytest.raises(EvaluationError, match=r"clip7: decoded frames \[4, 3, 48, 64\]"):
        metric_set.evaluate(smooth_video(t=5), smooth_video(t=4), video="clip7")
    with pytest.raises(EvaluationError, match=r"\[T, 3, H, W\]"):
        metric_set.evaluate(torch.rand(3, 8, 8), torch.rand(3, 8, 8))


def test_lpips_backbone_file_is_loaded(tmp_path: Path, empty_hub_cache: Path) -> None:
    torch.manual_seed(3)
    alexnet = torchvision.models.alexnet(weights=None)
    path = tmp_path / "alexnet.pth"
    torch.save(alexnet.state_dict(), path)
    metric_set = MetricSet(MetricConfig(metrics=("lpips",), lpips_backbone=path))
    trunk = metric_set._lpips.net
    assert torch.equal(trunk.slice1[0].weight, alexnet.features[0].weight)
    assert torch.equal(getattr(trunk.slice5, "10").bias, alexnet.features[10].bias)
    assert metric_set.random_backbones == []
    x = smooth_video(t=2)
    assert set(metric_set.evaluate(x, x * 0.8).summary) >= {"lpips"}
    # the hub cache torchvision would download into is found without the param
    cached = default_alexnet_path()
    assert str(cached).startswith(str(empty_hub_cache))
    cached.parent.mkdir(parents=True)
    torch.save(alexnet.state_dict(), cached)
    assert MetricSet(MetricConfig(metrics=("lpips",))).random_backbones == []
    # a file that is not AlexNet's is refused by name
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(MissingWeightsError, match=r"evaluate\.lpips_backbone.*not a torchvision"):
        MetricSet(MetricConfig(metrics=("lpips",), lpips_backbone=tmp_path / "other.pth"))


def test_fid_and_kid_on_small_sets_with_random_backbone() -> None:
    metric_set = random_set(("fid", "kid"))
    x = smooth_video(t=4, h=32, w=32)
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4))).clamp(0, 1)
    same = metric_set.evaluate(x, x.clone()).summary
    worse = metric_set.evaluate(x, noisy).summary
    fid, kid = "fid" + RANDOM_SUFFIX, "kid" + RANDOM_SUFFIX
    assert "fid" not in same and same["random_backbones"] == ["inception"]
    assert same[fid] == pytest.approx(0.0, abs=1e-6)
    assert worse[fid] > 1e-3
    # the unbiased KID estimator of a set against itself is ~0 (it may dip below 0)
    assert abs(same[kid]) < 0.05 * worse[kid]
    assert same["kid_subset_size" + RANDOM_SUFFIX] == 4


def test_inception_weights_file_is_loaded(tmp_path: Path) -> None:
    source = _load_inception(None, seed=5)
    path = tmp_path / "inception.pth"
    torch.save(source.state_dict(), path)
    metric_set = MetricSet(MetricConfig(metrics=("fid",), inception_weights=path))
    assert metric_set.random_backbones == []
    assert torch.equal(
        metric_set._inception.Conv2d_1a_3x3.conv.weight, source.Conv2d_1a_3x3.conv.weight
    )
    assert default_inception_path().name == "weights-inception-2015-12-05-6726825d.pth"
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(MissingWeightsError, match=r"evaluate\.inception_weights"):
        MetricSet(MetricConfig(metrics=("fid",), inception_weights=tmp_path / "bad.pth"))


@pytest.mark.parametrize(("n1", "n2", "d"), [(10, 12, 64), (90, 100, 16)])
def test_frechet_distance_matches_torchmetrics(n1: int, n2: int, d: int) -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    from pipeline.backbones import InceptionFeatures as _Features

    g = torch.Generator().manual_seed(6)
    real = torch.randn(n1, d, generator=g, dtype=torch.float64) @ torch.randn(
        d, d, generator=g, dtype=torch.float64
    )
    fake = 1.5 * torch.randn(n2, d, generator=g, dtype=torch.float64) + 0.3
    reference = FrechetInceptionDistance(feature=_Features(d))
    reference.update(real, real=True)
    reference.update(fake, real=False)
    assert frechet_distance(real, fake) == pytest.approx(float(reference.compute()), rel=1e-6)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)


def test_hific_patches_cover_grid_and_shifted_grid() -> None:
    frames = torch.rand(2, 3, 64, 96)
    patches = _hific_patches(frames, 32)
    # 2x3 grid + a (48 // 32) x (80 // 32) = 1x2 grid shifted by 16, per frame
    assert patches.shape == (2 * (6 + 2), 3, 32, 32)
    assert torch.equal(patches[0], frames[0, :, :32, :32])
    assert torch.equal(patches[-1], frames[1, :, 16:48, 48:80])
    with pytest.raises(EvaluationError, match=r"evaluate\.fid_patch_size"):
        _hific_patches(frames, 128)


def test_yuv420_psnr_weights_luma_six_to_one() -> None:
    """DCVC's measure: (6 PSNR_Y + PSNR_U + PSNR_V) / 8 on the 8-bit 4:2:0 planes. A
    luma shift (through RGB, which moves chroma a little too) checks the weights against the
    planes computed here."""
    import numpy as np

    from pipeline.eval.yuv_metrics import yuv420_psnr
    from plvc.video_io import rgb_to_yuv420, yuv420_to_rgb

    rng = np.random.default_rng(0)
    y = rng.integers(40, 200, (1, 32, 32)).astype(np.uint8)[0]
    u = rng.integers(100, 156, (16, 16)).astype(np.uint8)
    v = rng.integers(100, 156, (16, 16)).astype(np.uint8)
    base = yuv420_to_rgb(y, u, v)
    # the frame must survive RGB -> YUV itself for the planes to be what we set
    y0, u0, v0 = rgb_to_yuv420(base)
    frames = torch.from_numpy(base).permute(2, 0, 1)[None].float() / 255
    assert yuv420_psnr(frames, frames) == [math.inf]
    # luma 2 levels up everywhere, chroma untouched (where the clamp allows)
    y_up = np.clip(y0.astype(int) + 2, 0, 255).astype(np.uint8)
    shifted = yuv420_to_rgb(y_up, u0, v0)
    y1, u1, v1 = rgb_to_yuv420(shifted)
    other = torch.from_numpy(shifted).permute(2, 0, 1)[None].float() / 255
    expected_planes = []
    for p, q in ((y0, y1), (u0, u1), (v0, v1)):
        mse = np.mean((p.astype(float) - q.astype(float)) ** 2)
        expected_planes.append(math.inf if mse == 0 else 10 * math.log10(255**2 / mse))
    py, pu, pv = expected_planes
    (got,) = yuv420_psnr(frames, other)
    # RGB rounding moves chroma a little too: three finite, different plane PSNRs
    assert all(math.isfinite(p) for p in (py, pu, pv)) and len({py, pu, pv}) == 3
    assert got == pytest.approx((6 * py + pu + pv) / 8)
    assert got != pytest.approx((py + pu + pv) / 3)
