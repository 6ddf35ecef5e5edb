"""Config loading: reference defaults, overrides, and one-line errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from coreg.config import DEFAULT_CONFIG, RunConfig, load_config, parse_config, save_config
from coreg.errors import CoregError


def test_defaults_are_the_reference_recipe() -> None:
    cfg = RunConfig()
    t = cfg.train
    assert (t.lr, t.momentum, t.weight_decay, t.lr_min_factor) == (0.01, 0.9, 5e-4, 1e-3)
    assert (t.warmup_epochs, t.batch_size, t.warmup_batch_size) == (50, 256, 512)
    assert (t.sharpen_temperature, t.mixup_alpha, t.rampup_epochs, t.loss_history) == (0.5, 4.0, 16, 5)
    assert (t.proto_momentum, t.proto_temperature, t.con_temperature) == (0.999, 0.3, 0.07)
    assert (t.key_momentum, t.queue_size, t.proj_dim, t.proj_hidden) == (0.999, 8192, 128, 512)
    assert (t.reg_weight, t.reg_start_offset, t.clean_threshold) == (0.1, 10, 0.5)
    assert cfg.annotate.num_annotators == 27
    assert (cfg.aggregate.rule, cfg.aggregate.k, cfg.aggregate.ratio) == ("union", 5, 0.5)


def test_bundled_demo_config_loads() -> None:
    cfg = load_config(DEFAULT_CONFIG)
    assert cfg.data.source == "digits"
    assert cfg.train.backbone == "small_cnn"


def test_overrides_apply_with_yaml_types(tmp_path: Path) -> None:
    overrides = ["train.epochs=3", "train.warmup_epochs=1", "train.device=cpu", "aggregate.rule=topk"]
    cfg = load_config(DEFAULT_CONFIG, overrides)
    assert cfg.train.epochs == 3 and cfg.train.device == "cpu" and cfg.aggregate.rule == "topk"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"train": {"lr": -1}}, "invalid config field 'train.lr'"),
        ({"train": {"epochs": "many"}}, "invalid config field 'train.epochs'"),
        ({"train": {"learning_rate": 0.1}}, "invalid config field 'train.learning_rate': unknown key"),
        ({"aggregate": {"rule": "vote"}}, "invalid config field 'aggregate.rule'"),
        ({"data": {"source": "folder"}}, "data.path is required"),
        ({"train": {"epochs": 5, "warmup_epochs": 10}}, "warmup_epochs must not exceed"),
        ({"data": {"test_fraction": 1.5}}, "invalid config field 'data.test_fraction'"),
    ],
)
def test_invalid_values_fail_with_one_line_naming_the_field(data: dict, expected: str) -> None:
    with pytest.raises(CoregError) as info:
        parse_config(data, "my.yaml")
    message = str(info.value)
    assert expected in message
    assert message.startswith("my.yaml: ")
    assert "\n" not in message


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CoregError, match=r"missing\.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(CoregError, match=r"bad\.yaml: not valid YAML at line"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(CoregError, match="must be a mapping"):
        load_config(listy)


def test_saved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(DEFAULT_CONFIG, ["train.seed=7"])
    path = save_config(cfg, tmp_path)
    again = parse_config(yaml.safe_load(path.read_text()), str(path))
    assert again == cfg
