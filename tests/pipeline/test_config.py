from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, Params, flatten, load_params

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _base() -> dict:
    """The sample's params with every row of Table 1 (the sample lists one)."""
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["qualities"] = yaml.safe_load((REPO / "params-full.yaml").read_text())["qualities"]
    return data


@pytest.mark.parametrize(
    ("name", "qualities"),
    [("params.yaml", {"medium"}), ("params-full.yaml", {"low", "medium", "high"})],
)
def test_shipped_params_files_validate(name: str, qualities: set[str]) -> None:
    """The sample fans out over one quality, the paper's setting over Table 1's three; the
    sample's row is the paper's."""
    params = load_params(REPO / name)
    assert set(params.qualities) == qualities
    full = load_params(REPO / "params-full.yaml").qualities
    assert all(params.qualities[q] == full[q] for q in qualities)


def test_sample_is_default_and_full_is_vimeo() -> None:
    assert load_params(REPO / "params.yaml").download.source == "sample"
    assert load_params(REPO / "params-full.yaml").download.source == "vimeo90k"


def test_table1_values_loaded() -> None:
    q = load_params(REPO / "params-full.yaml").qualities
    assert (q["low"].r_target, q["low"].lmbda, q["low"].alpha1) == (0.025, 256, 3.0)
    assert (q["high"].alpha2, q["medium"].lmbda) == (0.001, 512)


def test_unknown_key_is_named(tmp_path: Path) -> None:
    data = _base()
    data["shard"]["rows_per_shrad"] = 10
    with pytest.raises(ConfigError, match=r"shard\.rows_per_shrad: unknown key"):
        load_params(_write(tmp_path, data))


def test_uri_paths_are_refused_not_mangled(tmp_path: Path) -> None:
    data = _base()
    data["paths"]["shards"] = "s3://bucket/shards"
    with pytest.raises(ConfigError, match=r"paths\.shards = 's3://bucket/shards'.*filesystem path"):
        load_params(_write(tmp_path, data))
    data["paths"]["shards"] = "/mnt/shared/shards"
    assert str(load_params(_write(tmp_path, data)).paths.shards) == "/mnt/shared/shards"


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    data = _base()
    data["shard"]["row_group_rows"] = "many"
    with pytest.raises(ConfigError, match=r"shard\.row_group_rows = 'many'"):
        load_params(_write(tmp_path, data))


def test_negative_rate_rejected(tmp_path: Path) -> None:
    data = _base()
    data["qualities"]["low"]["r_target"] = -0.1
    with pytest.raises(ConfigError, match=r"qualities\.low\.r_target = -0\.1"):
        load_params(_write(tmp_path, data))


def test_crop_larger_than_frames_rejected(tmp_path: Path) -> None:
    data = _base()
    data["data"]["crop_width"] = 512
    with pytest.raises(ConfigError, match=r"data\.crop_width = 512 is larger than the frames"):
        load_params(_write(tmp_path, data))


def test_alpha2_above_alpha1_rejected(tmp_path: Path) -> None:
    data = _base()
    data["qualities"]["high"]["alpha2"] = 1.0
    with pytest.raises(ConfigError, match=r"qualities\.high.*alpha2"):
        load_params(_write(tmp_path, data))


def test_zip_source_needs_path(tmp_path: Path) -> None:
    data = _base()
    data["download"]["source"] = "zip"
    with pytest.raises(ConfigError, match=r"download.*zip_path"):
        load_params(_write(tmp_path, data))


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    data = _base()
    data["seed"] = -1
    data["tracking"]["experiment"] = ""
    with pytest.raises(ConfigError) as info:
        load_params(_write(tmp_path, data))
    assert "seed = -1" in str(info.value)
    assert "tracking.experiment" in str(info.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read params file"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(bad)


def test_flatten_gives_dotted_keys() -> None:
    flat = flatten(Params())
    assert flat["shard.row_group_rows"] == 200
    assert flat["qualities.low.lmbda"] == 256


def test_phase_crop_larger_than_frames_rejected(tmp_path: Path) -> None:
    data = _base()
    data["train"]["gan"]["crop"] = 300
    with pytest.raises(ConfigError, match=r"train\.gan\.crop = 300 is larger than the frames"):
        load_params(_write(tmp_path, data))


def test_evaluate_gop_and_metric_names_checked(tmp_path: Path) -> None:
    data = _base()
    data["evaluate"]["gop"] = 0
    data["evaluate"]["metrics"] = ["psnr", "lpips"]
    with pytest.raises(ConfigError) as info:
        load_params(_write(tmp_path, data))
    assert "evaluate.gop = 0" in str(info.value)
    assert "evaluate.metrics.0 = 'psnr'" in str(info.value)


def test_full_setting_uses_paper_sizes() -> None:
    full = load_params(REPO / "params-full.yaml")
    assert full.train.model == "paper" and full.hific.preset == "paper"
    assert full.train.multi_p.num_pframes == 6 and full.evaluate.gop == 9
    # the GAN phase as the release trained the published models: its loss on 4 P-frames
    assert full.train.gan.loss == "official" and full.train.gan.num_pframes == 4
    assert full.runner.use_gpu
