"""The dry run of the full setting (``python -m pipeline.dry_run``): the paper's sizes, tiny
data and step counts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_params
from pipeline.dry_run import DRY_STEPS, dry_run_settings, stage_commands, train_every_phase

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_keeps_the_full_settings_models_and_losses(tmp_path: Path) -> None:
    settings, notes = dry_run_settings(REPO / "params-full.yaml", "high", tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(settings))
    dry, full = load_params(tmp_path / "params.yaml"), load_params(REPO / "params-full.yaml")
    # what decides whether the full setting starts is kept: sizes, losses, Table 1
    assert dry.hific.preset == full.hific.preset == "paper"
    assert (dry.train.model, dry.train.discriminator) == ("paper", "paper")
    assert dry.train.gan.loss == full.train.gan.loss == "official"
    assert dry.train.gan.num_pframes == full.train.gan.num_pframes
    assert dry.train.multi_p.num_pframes == full.train.multi_p.num_pframes
    assert dry.qualities == {"high": full.qualities["high"]}  # type: ignore[index]
    assert dry.hific.operating_points["high"] == full.hific.operating_points["high"]
    # every warm-up sub-phase still runs once, then eq. 4
    single_p = dry.train.single_p
    assert (single_p.flow_steps, single_p.mc_steps, single_p.steps) == (1, 1, DRY_STEPS["single_p"])
    # what costs time is cut: data, steps, batch, workers, GPUs
    assert dry.download.source == "sample" and dry.download.sample.videos == ["carphone_pristine"]
    assert dry.hific.warmup_steps + dry.hific.gan_steps == 4
    assert (dry.runner.num_workers, dry.runner.use_gpu, dry.runner.bf16) == (1, False, False)
    assert dry.evaluate.max_clips == 1 and len(dry.evaluate.baselines) == 1
    # LPIPS without AlexNet weights here: a random trunk, said out loud
    assert dry.hific.lpips_backbone == dry.train.gan.lpips_backbone
    assert Path(dry.train.gan.lpips_backbone).is_file()  # type: ignore[arg-type]
    assert any("randomly initialised AlexNet" in note for note in notes)
    assert not {"lpips", "fid", "kid", "tlp"} & set(dry.evaluate.metrics)
    # one quality's stages in dvc.yaml's order
    names = [name for name, _ in stage_commands("high")]
    assert names[:4] == ["download", "shard", "train_hific@high", "iframes@high"]
    assert names[-1] == "evaluate_report" and len(names) == 10


def test_dry_run_of_an_unknown_quality_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="quality 'ultra' is not in 'qualities'"):
        dry_run_settings(REPO / "params-full.yaml", "ultra", tmp_path)


def test_every_phase_of_the_full_setting_trains_at_the_papers_sizes(tmp_path: Path) -> None:
    """The in-process half of the dry run: the paper-size models of every phase are built
    together by the pipeline's builders and take two training iterations each."""
    settings, _ = dry_run_settings(REPO / "params-full.yaml", "low", tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(settings))
    steps = train_every_phase(load_params(tmp_path / "params.yaml"), "low")
    assert [s["phase"] for s in steps] == [
        "hific_warmup",
        "hific_gan",
        "single_p",
        "multi_p",
        "gan",
    ]
    by_phase = {s["phase"]: s for s in steps}
    assert 170e6 < by_phase["hific_warmup"]["parameters"] < 200e6  # HiFiC's ~181 M
    assert by_phase["hific_gan"]["parameters"] > by_phase["hific_warmup"]["parameters"]  # + D
    assert by_phase["gan"]["parameters"] > by_phase["multi_p"]["parameters"]  # + D
    assert all(math.isfinite(loss) for s in steps for loss in s["losses"])
    # multi-P codes 6 P-frames where single-P codes one: the count sees the recurrence
    assert by_phase["multi_p"]["flops"] > 4 * by_phase["single_p"]["flops"] > 0
