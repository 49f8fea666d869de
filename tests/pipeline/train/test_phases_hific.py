"""HiFiC's training phases (pipeline.train.phases.hific) in one process: batches of sampled frames,
loss terms, the D/G alternation with D conditioned on ŷ, LPIPS from a weights file, export.
The Ray Train runs are covered by tests/stages/test_hific_stages.py."""

from __future__ import annotations

import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision

from pipeline.backbones import MissingWeightsError
from pipeline.config import ConfigError, Params
from pipeline.train.phase import DataError, RunnerError
from pipeline.train.phases.hific import HiFiCGANPhase, HiFiCWarmupPhase, hific_phases
from pipeline.train.stepper import PhaseStepper
from plvc.hific import HiFiCConfig, load_hific
from plvc.hific_losses import HiFiCLossWeights
from plvc.intra import get_intra_codec

TINY = HiFiCConfig.tiny()
LOSS = HiFiCLossWeights(target_bpp=0.3, lambda_a=1.0, lambda_b=2**-4, k_p=0.0)
WHOLE = {"crop": 64, "random_flip": False}  # the 64x64 test frames, unchanged


def _rows(clips: int = 2, size: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """Smooth random clips: each frame a shifted gradient plus noise, frame t brighter."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    frames = np.empty((clips, 7, size, size, 3), np.uint8)
    for c in range(clips):
        base = (xx * rng.uniform(0.5, 2) + yy * rng.uniform(0.5, 2))[..., None] % 200
        for t in range(7):
            noise = rng.integers(0, 8, (size, size, 3))
            frames[c, t] = np.clip(base + 6 * t + noise, 0, 255)
    return {"clip_id": np.array([f"c/{c}" for c in range(clips)], object), "frames": frames}


def _stepper(phase: HiFiCWarmupPhase) -> PhaseStepper:
    torch.manual_seed(0)
    models = phase.build_models()
    phase.setup(torch.device("cpu"))
    return PhaseStepper(phase, models, phase.build_optimizers(models), grad_clip=1.0)


def test_batches_are_distinct_random_frames_of_each_clip() -> None:
    rows = _rows(clips=3)
    cpu = torch.device("cpu")
    for k in (1, 3, 7):  # 7: every frame of each clip
        torch.manual_seed(k)
        x = HiFiCWarmupPhase(TINY, LOSS, frames_per_clip=k, **WHOLE).prepare_batch(rows, cpu)
        assert x.shape == (3 * k, 3, 64, 64) and x.dtype == torch.float32
        images = (x * 255).round().byte().permute(0, 2, 3, 1).numpy()
        for c in range(3):
            picked = []
            for image in images[c * k : (c + 1) * k]:
                matches = [t for t in range(7) if np.array_equal(image, rows["frames"][c, t])]
                assert len(matches) == 1  # a frame of its own clip, whole
                picked.append(matches[0])
            assert len(set(picked)) == k
    # over many draws every frame position is used
    torch.manual_seed(0)
    phase = HiFiCWarmupPhase(TINY, LOSS, **WHOLE)
    seen = {
        int(np.argmax([np.array_equal(img, f) for f in rows["frames"][0]]))
        for img in (
            (phase.prepare_batch(rows, cpu)[0] * 255).round().byte().permute(1, 2, 0).numpy()
            for _ in range(60)
        )
    }
    assert seen == set(range(7))
    with pytest.raises(ValueError, match="frames_per_clip"):
        HiFiCWarmupPhase(TINY, LOSS, frames_per_clip=8)
    with pytest.raises(ValueError, match="multiple of the HiFiC stride 64"):
        HiFiCWarmupPhase(TINY, LOSS, crop=96)


def test_each_image_gets_its_own_random_window_and_flip() -> None:
    # pixels that say where they are: R = row, G = column, B = 30 * frame + 10 * clip
    yy, xx = np.mgrid[0:128, 0:128]
    frames = np.empty((2, 7, 128, 128, 3), np.uint8)
    for c in range(2):
        for t in range(7):
            frames[c, t] = np.stack([yy, xx, np.full_like(yy, 30 * t + 10 * c)], axis=-1)
    rows = {"frames": frames}
    phase = HiFiCWarmupPhase(TINY, LOSS, frames_per_clip=2, crop=64, random_flip=True)
    torch.manual_seed(0)
    windows, flips = set(), 0
    for _ in range(15):
        images = (phase.prepare_batch(rows, torch.device("cpu")) * 255).round().byte()
        assert images.shape == (4, 3, 64, 64)
        picked = []
        for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
            c = i // 2
            offset = int(image[0, 0, 2]) - 10 * c
            assert offset % 30 == 0  # a frame of its own clip
            t = offset // 30
            top, left = int(image[0, 0, 0]), int(image[0, :, 1].min())
            flip = image[0, 0, 1] > image[0, 1, 1]
            window = frames[c, t, top : top + 64, left : left + 64]
            np.testing.assert_array_equal(image, window[:, ::-1] if flip else window)
            picked.append((c, t))
            windows.add((top, left))
            flips += bool(flip)
        assert picked[0] != picked[1] and picked[2] != picked[3]  # distinct frames per clip
    assert len(windows) > 20 and 0 < flips < 60
    # resuming restores the torch RNG: the same draws again
    torch.manual_seed(5)
    first = phase.prepare_batch(rows, torch.device("cpu"))
    torch.manual_seed(5)
    assert torch.equal(first, phase.prepare_batch(rows, torch.device("cpu")))
    small = HiFiCWarmupPhase(TINY, LOSS, crop=128)
    with pytest.raises(DataError, match=r"smaller than the 128x128 crop \(hific\.crop\)"):
        small.prepare_batch(_rows(size=64), torch.device("cpu"))


def _encoded(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows as the encoded reader gives them: per clip an object array of 7 PNGs."""
    clips = np.empty(len(rows["frames"]), dtype=object)
    for c, clip in enumerate(rows["frames"]):
        pngs = np.empty(len(clip), dtype=object)
        pngs[:] = [cv2.imencode(".png", frame[..., ::-1])[1].tobytes() for frame in clip]
        clips[c] = pngs
    return {**rows, "frames": clips}


def test_encoded_clips_give_the_same_images_and_decode_only_the_drawn_frames(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = _rows(clips=3, size=128)
    encoded = _encoded(rows)
    phase = HiFiCWarmupPhase(TINY, LOSS, frames_per_clip=2, crop=64, random_flip=True)
    cpu = torch.device("cpu")
    for seed in range(3):
        torch.manual_seed(seed)
        decoded_batch = phase.prepare_batch(rows, cpu)
        torch.manual_seed(seed)
        assert torch.equal(phase.prepare_batch(encoded, cpu), decoded_batch)

    import pipeline.train.phases.hific as hific_phase

    calls = []
    real = hific_phase.decode_png_rgb
    monkeypatch.setattr(hific_phase, "decode_png_rgb", lambda png: calls.append(1) or real(png))
    phase.prepare_batch(encoded, cpu)
    assert len(calls) == 3 * 2  # two drawn frames of each of the three clips, not all 21

    broken = _encoded(rows)
    broken["frames"][1] = np.array([b"not a png"] * 7, dtype=object)
    with pytest.raises(DataError, match=r"clip c/1, frame im\d\.png: not a decodable image"):
        phase.prepare_batch(broken, cpu)


def test_warmup_step_logs_the_rate_distortion_terms_and_trains_the_quantiles() -> None:
    phase = HiFiCWarmupPhase(TINY, LOSS, frames_per_clip=2, crop=64)
    stepper = _stepper(phase)
    quantiles = stepper.models.generator.entropy_bottleneck.quantiles.detach().clone()
    batch = phase.prepare_batch(_rows(), torch.device("cpu"))
    terms = stepper.step(batch, step=1)
    expected = {"loss", "bpp", "bpp_y", "bpp_z", "bpp_quantized", "mse", "psnr", "rate_weight"}
    assert expected | {"target_bpp", "aux_loss", "grad_norm_generator"} <= set(terms)
    assert not {"gan", "lpips", "d_loss"} & set(terms)
    assert all(torch.isfinite(v) for v in terms.values())
    assert terms["psnr"] == pytest.approx(10 * np.log10(255**2 / terms["mse"].item()), rel=1e-5)
    # the weighted terms add up to the loss (no LPIPS, no GAN in the warm-up)
    assert terms["loss"] == pytest.approx((terms["weighted_rate"] + terms["weighted_mse"]).item())
    assert not torch.equal(quantiles, stepper.models.generator.entropy_bottleneck.quantiles)


def test_the_loss_schedule_counts_the_warmup_steps_before_the_gan_phase() -> None:
    loss = HiFiCLossWeights(target_bpp=0.3, lambda_a=1.0, lambda_b=2**-4, k_p=0.0, warmup_steps=10)
    batch = HiFiCWarmupPhase(TINY, loss, crop=64).prepare_batch(_rows(), torch.device("cpu"))
    early = _stepper(HiFiCWarmupPhase(TINY, loss, crop=64)).step(batch, step=1)
    late = _stepper(HiFiCGANPhase(TINY, loss, crop=64, step_offset=10)).step(batch, step=1)
    assert early["target_bpp"] == pytest.approx(0.3 * loss.warmup_target_factor)
    assert late["target_bpp"] == pytest.approx(0.3)


def test_gan_step_trains_d_on_real_and_fake_conditioned_on_the_latent() -> None:
    phase = HiFiCGANPhase(TINY, LOSS, crop=64)
    stepper = _stepper(phase)
    g, d = stepper.models.generator, stepper.models.discriminator
    assert d is not None
    calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    d.register_forward_hook(lambda m, args, out: calls.append((args[0].shape, args[1].shape)))
    batch = phase.prepare_batch(_rows(), torch.device("cpu"))

    outputs = stepper.forward(batch, step=1)
    g0 = {k: v.detach().clone() for k, v in g.named_parameters()}
    d_terms = stepper.discriminator_step(batch, outputs, step=1)
    assert all(torch.equal(g0[k], v) for k, v in g.named_parameters())
    d1 = {k: v.detach().clone() for k, v in d.named_parameters()}
    g_terms = stepper.generator_step(batch, outputs, step=1)
    assert all(torch.equal(d1[k], v) for k, v in d.named_parameters())

    latent = outputs["y_hat"].shape
    # D step: real and fake in one batch, each with the latent; G step: the fakes alone
    assert calls == [((4, 3, 64, 64), (4, *latent[1:])), ((2, 3, 64, 64), tuple(latent))]
    assert {"d_loss", "d_real_loss", "d_fake_loss", "d_real_prob", "d_fake_prob"} <= set(d_terms)
    assert d_terms["d_loss"] == pytest.approx(
        (d_terms["d_real_loss"] + d_terms["d_fake_loss"]).item()
    )
    assert {"gan", "weighted_gan"} <= set(g_terms)
    assert g_terms["weighted_gan"] == pytest.approx(LOSS.beta * g_terms["gan"].item())


def test_export_is_a_hific_checkpoint_that_starts_the_gan_phase(tmp_path: Path) -> None:
    warmup = HiFiCWarmupPhase(TINY, LOSS, crop=64)
    stepper = _stepper(warmup)
    stepper.step(warmup.prepare_batch(_rows(), torch.device("cpu")), step=1)
    warmup.export(stepper.models, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hific.pt"]
    model, meta = load_hific(tmp_path / "hific.pt")
    assert model.config == TINY and meta["phase"] == "hific_warmup"
    codec = get_intra_codec("hific", weights=tmp_path / "hific.pt")
    image = torch.rand(3, 48, 80)
    assert codec.decode(codec.encode(image)).shape == image.shape  # padded and cropped back

    gan = HiFiCGANPhase(TINY, LOSS, crop=64)
    models = gan.build_models()
    gan.apply_init_weights(models, gan.read_init_weights(tmp_path))
    trained = dict(stepper.models.generator.named_parameters())
    assert all(torch.equal(p, trained[k]) for k, p in models.generator.named_parameters())

    gan_stepper = PhaseStepper(gan, models, gan.build_optimizers(models), grad_clip=1.0)
    gan_stepper.step(gan.prepare_batch(_rows(), torch.device("cpu")), step=1)
    out = tmp_path / "gan"
    out.mkdir()
    gan.export(models, out)
    assert sorted(p.name for p in out.iterdir()) == ["discriminator.pt", "hific.pt"]
    # a later GAN run continues D too
    assert set(gan.read_init_weights(out)) == {"generator", "discriminator"}

    with pytest.raises(RunnerError, match=r"HiFiC config .* differs"):
        HiFiCWarmupPhase(HiFiCConfig.small(), LOSS, crop=64).read_init_weights(tmp_path)
    with pytest.raises(RunnerError, match="does not exist"):
        gan.read_init_weights(tmp_path / "nowhere")


def test_lpips_needs_the_backbone_param_and_loads_it(tmp_path: Path) -> None:
    with_lpips = HiFiCLossWeights(target_bpp=0.3, lambda_a=1.0, lambda_b=2**-4, k_p=1.0)
    with pytest.raises(MissingWeightsError, match=r"hific\.lpips_backbone is not set"):
        HiFiCWarmupPhase(TINY, with_lpips, crop=64).load_lpips()
    missing = r"hific\.lpips_backbone = .*nope\.pth.*no such file"
    with pytest.raises(MissingWeightsError, match=missing):
        HiFiCWarmupPhase(
            TINY, with_lpips, crop=64, lpips_backbone=str(tmp_path / "nope.pth")
        ).load_lpips()
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(MissingWeightsError, match=r"not a torchvision AlexNet state dict"):
        HiFiCWarmupPhase(
            TINY, with_lpips, crop=64, lpips_backbone=str(tmp_path / "other.pth")
        ).load_lpips()

    torch.manual_seed(3)
    alexnet = torchvision.models.alexnet(weights=None)
    torch.save(alexnet.state_dict(), tmp_path / "alexnet.pth")
    phase = HiFiCWarmupPhase(
        TINY, with_lpips, crop=64, lpips_backbone=str(tmp_path / "alexnet.pth")
    )
    phase.load_lpips()
    (tmp_path / "alexnet.pth").unlink()  # the trunk travels with the phase, as to a Ray worker
    shipped = pickle.loads(pickle.dumps(phase))
    stepper = _stepper(shipped)
    trunk = shipped._lpips.net
    assert torch.equal(trunk.slice1[0].weight, alexnet.features[0].weight)
    assert torch.equal(getattr(trunk.slice5, "10").bias, alexnet.features[10].bias)
    terms = stepper.step(shipped.prepare_batch(_rows(), torch.device("cpu")), step=1)
    assert terms["lpips"] > 0 and terms["weighted_lpips"] == pytest.approx(terms["lpips"].item())
    assert all(not p.requires_grad for p in shipped._lpips.parameters())


def test_phases_from_params() -> None:
    params = Params.model_validate(
        {
            "hific": {
                "preset": "tiny",
                "warmup_steps": 40,
                "gan_steps": 20,
                "batch_size": 3,
                "crop": 128,
                "lr_d": 5e-5,
                "operating_points": {
                    "low": {"target_bpp": 0.1, "lambda_a": 2.0, "lambda_b": 0.5, "k_p": 0.0}
                },
            }
        }
    )
    warmup, gan = hific_phases(params, "low")
    assert warmup.model == TINY and warmup.batch_size == 3 and warmup.step_offset == 0
    assert warmup.crop == 128 and warmup.random_flip == params.data.random_flip
    assert warmup.loss.target_bpp == 0.1 and warmup.loss.lambda_b == 0.5 and not warmup.uses_lpips
    # the release's GAN run starts its step count over: rate warm-up and lr decay re-applied
    assert gan is not None and gan.step_offset == 0 and gan.lr_d == 5e-5
    assert warmup.config()["loss"]["k_p"] == 0.0  # JSON settings compared on resume
    for schedules, offset, lr in (("restart", 0, 1e-4), ("continue", 40, 1e-5)):
        hific = params.hific.model_copy(
            update={"gan_schedules": schedules, "lr_milestones": [30], "lr": 1e-4}
        )
        _, later = hific_phases(params.model_copy(update={"hific": hific}), "low")
        assert later is not None and later.step_offset == offset
        optimizers = later.generator_optimizers(later.build_models())
        assert optimizers.generator.param_groups[0]["lr"] == pytest.approx(lr)
    no_gan = params.model_copy(update={"hific": params.hific.model_copy(update={"gan_steps": 0})})
    assert hific_phases(no_gan, "low")[1] is None
    with pytest.raises(ConfigError, match="no entry for quality 'high'"):
        hific_phases(params, "high")


def test_hific_lr_milestones_count_steps_across_warmup_and_gan() -> None:
    """hific.lr_milestones count HiFiC steps over both sub-phases: the warm-up's rate drops at
    its milestone, the GAN phase starts at the decayed rate and meets later milestones at the
    right step of its own count."""

    def lrs(phase: HiFiCWarmupPhase, steps: int) -> list[float]:
        models = phase.build_models()
        optimizers = phase.build_optimizers(models)
        out = []
        for _ in range(steps):
            out.append(optimizers.generator.param_groups[0]["lr"])
            optimizers.generator.step()
            for scheduler in optimizers.schedulers.values():
                scheduler.step()
        return out

    common = dict(model=HiFiCConfig.tiny(), loss=LOSS, lr=1e-3, crop=64)
    warmup = HiFiCWarmupPhase(**common, lr_milestones=[3, 7], lr_gamma=0.5)
    assert lrs(warmup, 4) == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4])
    gan = HiFiCGANPhase(**common, lr_milestones=[3, 7], lr_gamma=0.5, step_offset=5)
    assert lrs(gan, 3) == pytest.approx([5e-4, 5e-4, 2.5e-4])
    assert lrs(HiFiCWarmupPhase(**common), 3) == pytest.approx([1e-3] * 3)  # none: constant
