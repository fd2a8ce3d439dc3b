"""Run-config validation, and the defaults and docs/configuration.md staying in step with the
dataclasses."""

import tomllib
from pathlib import Path

import pytest

from pmafl.config import (
    DATASET_DEFAULTS,
    ConfigError,
    RunConfig,
    TrainConfig,
    auto_keys,
    documented_defaults,
    markdown_table,
    parse_overrides,
)
from pmafl.objectives import OBJECTIVES

ROOT = Path(__file__).resolve().parents[1]


def pyproject_run_config():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_are_the_documented_defaults():
    assert pyproject_run_config() == documented_defaults()
    # On digits (the default dataset) every "auto" resolves to the dataclass default.
    assert RunConfig.from_mapping(pyproject_run_config()) == RunConfig() == RunConfig.from_mapping({})


def test_auto_keys_resolve_per_dataset_and_explicit_values_win():
    cfg = RunConfig.from_mapping({**pyproject_run_config(), "dataset": "fashion-mnist"})
    fm = DATASET_DEFAULTS["fashion-mnist"]
    assert (cfg.train.eps, cfg.train.train_attack, cfg.teacher_attack, cfg.max_train_examples) == \
        (fm["eps"], fm["train-attack"], fm["teacher-attack"], fm["max-train-examples"])
    assert cfg.to_dict()["eps"] == 0.1  # results.json and checkpoints hold the resolved value
    cfg = RunConfig.from_mapping({"dataset": "fashion-mnist", "eps": 0.3, "train-attack": "pgd"})
    assert cfg.train.eps == 0.3 and cfg.train.train_attack == "pgd"
    with pytest.raises(ConfigError, match="'eps': expected a number >= 0, got 'automatic'"):
        RunConfig.from_mapping({"eps": "automatic"})
    with pytest.raises(ConfigError, match="'objective': expected one of"):
        RunConfig.from_mapping({"objective": "auto"})  # only auto keys take "auto"


def test_every_dataset_states_every_auto_key():
    assert all(set(values) == set(auto_keys()) for values in DATASET_DEFAULTS.values())
    assert all(documented_defaults()[key] == "auto" for key in auto_keys())


def test_objective_choices_come_from_the_one_registry():
    assert RunConfig.from_mapping({"objective": "calfat"}).train.objective == "calfat"
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({"objective": "nope"})
    assert all(repr(name) in str(err.value) for name in OBJECTIVES)


def test_run_config_overrides_parse_like_flwr_run():
    assert parse_overrides(["dataset='fashion-mnist' eps=0.1", "num-server-rounds=3 download=true"]) \
        == {"dataset": "fashion-mnist", "eps": 0.1, "num-server-rounds": 3, "download": True}
    with pytest.raises(ConfigError, match="TOML syntax"):
        parse_overrides(["dataset=fashion"])


def test_readme_documents_every_key_with_its_default():
    assert markdown_table() in (ROOT / "docs" / "configuration.md").read_text()


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
    ("pgd-step-ratio", 1.5, "'pgd-step-ratio': expected a number in (0, 1]"),
    ("train-attack", "pgd20", "'train-attack': expected one of 'pgd', 'fgsm-rs'"),
    ("max-train-examples", -1, "'max-train-examples': expected an integer >= 0"),
])
def test_invalid_values_name_the_key_and_what_is_allowed(key, value, expected):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({**pyproject_run_config(), key: value})
    assert expected in str(err.value)


def test_unknown_key_is_rejected_with_the_known_keys():
    with pytest.raises(ConfigError, match="key 'alhpa' is unknown; known keys: .*alpha"):
        RunConfig.from_mapping({"alhpa": 0.5})


def test_cross_key_rules():
    with pytest.raises(ConfigError, match="'attack-loss': 'kl' needs an objective that distils"):
        RunConfig.from_mapping({"attack-loss": "kl", "objective": "ce"})
    with pytest.raises(ConfigError, match="'min-available-nodes'"):
        RunConfig.from_mapping({"min-train-nodes": 5, "min-available-nodes": 2})


def test_overrides_land_in_typed_fields():
    cfg = RunConfig.from_mapping({"alpha": 1, "num-server-rounds": 3.0, "model": "torchvision/resnet18"})
    assert cfg.train.alpha == 1.0 and isinstance(cfg.train.alpha, float)
    assert cfg.num_server_rounds == 3 and isinstance(cfg.num_server_rounds, int)


def test_train_config_round_trips_through_a_record_and_ignores_server_round():
    train = TrainConfig(alpha=0.3, objective="pgd-at", pgd_steps=3, train_attack="fgsm-rs")
    assert TrainConfig.from_mapping({**train.to_record(), "server-round": 4}) == train


def test_fair_q_needs_the_weighted_mean():
    assert RunConfig.from_mapping({"fair-q": 1.0}).train.fair_q == 1.0
    with pytest.raises(ConfigError, match="'fair-q': q-FFL weights the mean, so it needs aggregation "
                                          "'mean', got 'median'"):
        RunConfig.from_mapping({"fair-q": 1.0, "aggregation": "median"})
    with pytest.raises(ConfigError, match="'fair-q': weight-cap bounds q-FFL's factors, so it needs "
                                          "weight-cap > 0, got 0.0"):
        RunConfig.from_mapping({"fair-q": 1.0, "weight-cap": 0})
