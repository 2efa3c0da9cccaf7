from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medsr.config import TrainConfig, from_dict, load_config
from medsr.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_list_disjoint_patients(path):
    config = load_config(path)
    assert config.train_scans and config.val_scans
    assert not set(config.train_scans) & set(config.val_scans)


def test_l1_and_mse_configs_differ_only_in_loss():
    l1, mse = (load_config(Path(CONFIGS[0]).parent / f"srresnet_{n}_x2.yaml") for n in ("l1", "mse"))
    assert (l1.loss, mse.loss) == ("l1", "mse")
    assert {**l1.to_dict(), "loss": None} == {**mse.to_dict(), "loss": None}


def test_overrides_reach_nested_keys_and_parse_yaml_values():
    config = load_config(None, ["model.features=48", "learning_rate=1e-3", "train_scans=[a, b]"])
    assert config.model.features == 48
    assert config.learning_rate == pytest.approx(1e-3)
    assert config.train_scans == ("a", "b")


@pytest.mark.parametrize("overrides, message", [
    (["learnig_rate=0.1"], "unknown config key 'learnig_rate'; did you mean 'learning_rate'"),
    (["model.feature=3"], "unknown config key 'model.feature'; did you mean 'model.features'"),
    (["loss=huber"], "'loss' must be one of l1, mse, not 'huber'"),
    (["scale=3"], "'scale' must be 2 or 4, not 3"),
    (["batch_size=two"], "'batch_size' must be int, not 'two'"),
    (["patch_size=97"], "'patch_size' must be a multiple of scale"),
    (["degradation.bicubic=0.9"], "probabilities must sum to 1"),
    (["epochs"], "--set expects key=value"),
    (["degrade_on=gpu"], "'degrade_on' must be one of auto, cpu, device, not 'gpu'"),
    (["task=through_plane", "degrade_on=device"], "'degrade_on' can be 'device' only for task in_plane"),
])
def test_bad_values_are_rejected_with_the_key_and_value(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "code.yaml").write_text("loss: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):  # safe_load refuses Python tags
        load_config(tmp_path / "code.yaml")


def test_to_dict_round_trips_through_yaml():
    config = load_config(None, ["model.features=16", "train_scans=[x]"])
    assert from_dict(TrainConfig, yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config


def test_degrade_on_defaults_to_auto_so_saved_runs_keep_their_meaning():
    """Runs saved before the key existed load with ``auto``: the CPU route on a CPU, as they ran."""
    assert load_config(None).degrade_on == "auto"
    assert load_config(None, ["degrade_on=cpu"]).degrade_on == "cpu"
