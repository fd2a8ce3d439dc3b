"""Run-config validation, and the defaults/README staying in step with the dataclasses."""

import tomllib
from pathlib import Path

import pytest

from pmafl.config import ConfigError, RunConfig, TrainConfig, markdown_table

ROOT = Path(__file__).resolve().parents[1]


def pyproject_run_config():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_are_the_dataclass_defaults():
    assert pyproject_run_config() == RunConfig().to_dict()
    assert RunConfig.from_mapping(pyproject_run_config()) == RunConfig()


def test_readme_documents_every_key_with_its_default():
    assert markdown_table() in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("key, value, expected", [
    ("alpha", 1.5, "'alpha': expected a number in [0, 1], got 1.5"),
    ("alpha", -0.1, "'alpha'"),
    ("eps", -0.01, "'eps': expected a number >= 0"),
    ("dataset", "mnist", "'dataset': expected one of 'digits', 'cifar10'"),
    ("objective", "fedprox", "'objective': expected one of 'pmafl', 'ce', 'pgd-at'"),
    ("model", "resnet999", "'model': expected one of cnn-large, cnn-small, resnet18"),
    ("teacher-model", "torchvision/nope", "'teacher-model'"),
    ("num-server-rounds", 2.5, "'num-server-rounds': expected an integer >= 1"),
    ("download", "yes", "'download': expected a boolean"),
    ("lr", 0.0, "'lr': expected a number > 0"),
])
def test_invalid_values_name_the_key_and_what_is_allowed(key, value, expected):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({**pyproject_run_config(), key: value})
    assert expected in str(err.value)


def test_unknown_key_is_rejected_with_the_known_keys():
    with pytest.raises(ConfigError, match="key 'alhpa' is unknown; known keys: .*alpha"):
        RunConfig.from_mapping({"alhpa": 0.5})


def test_cross_key_rules():
    with pytest.raises(ConfigError, match="'attack-loss': 'kl' needs objective 'pmafl'"):
        RunConfig.from_mapping({"attack-loss": "kl", "objective": "ce"})
    with pytest.raises(ConfigError, match="'min-available-nodes'"):
        RunConfig.from_mapping({"min-train-nodes": 5, "min-available-nodes": 2})


def test_overrides_land_in_typed_fields():
    cfg = RunConfig.from_mapping({"alpha": 1, "num-server-rounds": 3.0, "model": "torchvision/resnet18"})
    assert cfg.train.alpha == 1.0 and isinstance(cfg.train.alpha, float)
    assert cfg.num_server_rounds == 3 and isinstance(cfg.num_server_rounds, int)


def test_train_config_round_trips_through_a_record_and_ignores_server_round():
    train = TrainConfig(alpha=0.3, objective="pgd-at", pgd_steps=3)
    assert TrainConfig.from_mapping({**train.to_record(), "server-round": 4}) == train
