"""Typed, validated configuration: the one place every run-config key is defined.

Flower hands the ServerApp and ClientApp a flat mapping (`context.run_config`) built from
`[tool.flwr.app.config]` in pyproject.toml and `flwr run --run-config`. `RunConfig.from_mapping`
turns it into a frozen dataclass, rejecting unknown keys and bad values with an error that names
the key and what was expected. The local-training hyperparameters live in `TrainConfig`, which the
strategy broadcasts to clients each round and which the plug-in training function takes directly.

Each field's run-config key is its name with `_` replaced by `-`; its metadata holds its
documentation (the table in docs/configuration.md) and the allowed values.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pmafl.attacks import TRAIN_ATTACKS
from pmafl.attacks.pgd import ATTACK_LOSSES
from pmafl.backdoor import POSITIONS
from pmafl.compression import COMPRESSIONS
from pmafl.data import DATASETS
from pmafl.fedftg import VARIANTS
from pmafl.models import is_known_model, model_names
from pmafl.objectives import OBJECTIVES, active_add_ons, needs_teacher
from pmafl.protocol import LABEL_COUNTS, SERVER_ROUND
from pmafl.robustkd import FEATURE_STAGES

PARTITIONERS = ("iid", "dirichlet", "pathological")
AGGREGATIONS = ("mean", "trimmed-mean", "median")
DEVICES = ("auto", "cpu", "cuda")

# The protocol of each dataset: what a key set to "auto" (its default) means there.
# - eps: the L_inf radius each field uses for the data: 0.3 for MNIST is too easy to reach on 8x8
#   digits and too hard on Fashion-MNIST, whose literature uses 0.1; 8/255 for 32x32 colour images.
# - train-attack / teacher-attack: PGD-10 where a CPU affords it (8x8 digits), FGSM with random
#   start on 28x28 Fashion-MNIST: a fifth of a PGD-10 step for PGD-AT, half for PM-AFL
#   (docs/results/step-time/cpu-28x28.json).
# - public-fraction, max-train-examples, eval-examples, teacher-epochs: sized so that on 2 CPU
#   cores a teacher pre-trains in minutes (pretrain_seconds in docs/results/robustkd-*/vet.json)
#   and a 10-client federation of 30 rounds fits a session (0: all images).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"eps": 0.2, "train-attack": "pgd", "teacher-attack": "pgd", "teacher-epochs": 60,
               "public-fraction": 0.3, "max-train-examples": 0, "eval-examples": 0},
    "fashion-mnist": {"eps": 0.1, "train-attack": "fgsm-rs", "teacher-attack": "fgsm-rs",
                      "teacher-epochs": 15, "public-fraction": 0.1, "max-train-examples": 2000,
                      "eval-examples": 500},
    **{name: {"eps": 0.031373, "train-attack": "pgd", "teacher-attack": "pgd", "teacher-epochs": 60,
              "public-fraction": 0.3, "max-train-examples": 0, "eval-examples": 1000}
       for name in ("cifar10", "cifar100", "svhn")},
}
AUTO = "auto"


class ConfigError(ValueError):
    """A run-config key is unknown or holds a value outside what it allows."""


def _key(name: str) -> str:
    return name.replace("_", "-")


def option(default: Any, doc: str, *, choices: tuple | None = None, low: float | None = None,
           high: float | None = None, low_open: bool = False, auto: bool = False) -> Any:
    """A config field: default, docs/configuration.md text, and the allowed values (a set or a
    range). An `auto` field's run-config default is "auto", resolved per dataset from `DATASET_DEFAULTS`; its
    dataclass default is the digits value (for direct use, e.g. `TrainConfig()`)."""
    return field(default=default, metadata={"doc": doc, "choices": choices, "low": low,
                                             "high": high, "low_open": low_open, "auto": auto})


def _expected(f: dataclasses.Field) -> str:
    meta = f.metadata
    if meta["choices"]:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[type(f.default)]
    if meta["low"] is None and meta["high"] is None:
        return kind
    if meta["high"] is None:
        return f"{kind} {'>' if meta['low_open'] else '>='} {meta['low']:g}"
    left = "(" if meta["low_open"] else "["
    return f"{kind} in {left}{meta['low']:g}, {meta['high']:g}]"


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    """Check one value against its field and return it in the field's type."""
    meta, kind = f.metadata, type(f.default)
    bad = ConfigError(f"{where} key '{_key(f.name)}': expected {_expected(f)}, got {value!r}")
    if kind is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if kind is int:
        if isinstance(value, bool) or not (isinstance(value, int) or
                                           (isinstance(value, float) and value.is_integer())):
            raise bad
        value = int(value)
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise bad
        value = float(value)
    elif not isinstance(value, str):
        raise bad
    if meta["choices"] and value not in meta["choices"]:
        raise bad
    low, high = meta["low"], meta["high"]
    if low is not None and (value < low or (meta["low_open"] and value == low)):
        raise bad
    if high is not None and value > high:
        raise bad
    return value


def _build(cls: type, values: Mapping[str, Any], where: str, ignore: tuple[str, ...] = ()) -> Any:
    fields = {_key(f.name): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields) - set(ignore))
    if unknown:
        raise ConfigError(f"{where} key '{unknown[0]}' is unknown; known keys: {', '.join(sorted(fields))}")
    kwargs = {f.name: _coerce(f, values[key], where) for key, f in fields.items() if key in values}
    return cls(**kwargs)


@dataclass(frozen=True)
class TrainConfig:
    """Local-training hyperparameters: what a client needs to run one round of local training."""

    objective: str = option("pmafl", "Local objective: " + "; ".join(
        f"`{name}` ({objective.doc})" for name, objective in OBJECTIVES.items()) + ".",
        choices=tuple(OBJECTIVES))
    local_epochs: int = option(2, "Local epochs per round.", low=1)
    lr: float = option(0.05, "SGD learning rate of local training.", low=0, low_open=True)
    momentum: float = option(0.9, "SGD momentum.", low=0, high=1)
    weight_decay: float = option(5e-4, "SGD weight decay.", low=0)
    alpha: float = option(0.5, "Weight of the clean KD term: PM-AFL's L_VKD (L_AKD gets 1 - "
                          "alpha); `kdiga`'s KL to the teacher (CE gets 1 - alpha).", low=0, high=1)
    lambda_alg: float = option(0.01, "PM-AFL weight of L_ALG, the consistency with the received "
                               "global model.", low=0)
    tau: float = option(1.0, "Distillation temperature.", low=0, low_open=True)
    mixup_alpha: float = option(1.0, "Mixup coefficient a: lam ~ Beta(a, a); 0 turns mixup off "
                                "(the blend terms then repeat the plain terms).", low=0)
    grad_clip: float = option(5.0, "Clip each local step's gradient to this global L2 norm (0: "
                              "off); keeps distillation with a large tau or lambda from diverging.",
                              low=0)
    beta: float = option(6.0, "Robustness weight of `trades` and `mart`.", low=0)
    calfat_tau: float = option(1.0, "CalFAT's calibration strength: logits + tau * log(class prior).",
                               low=0)
    kdiga_weight: float = option(0.0, "Weight of KDIGA's input-gradient alignment L_GA, added to "
                                 "every objective that distils from the teacher (`kdiga`, `pmafl` "
                                 "and its ablations); 0: off.", low=0)
    robustkd_weight: float = option(0.0, "Weight of RobustKD's feature distillation from the "
                                    "detoxified teacher (`pmafl-teacher vet`), added to every "
                                    "objective that distils from the teacher; its logits then come "
                                    "from the detoxified teacher too. 0: off.", low=0)
    robustkd_noise: float = option(0.1, "Share of pixels of the feature term's inputs set to "
                                   "salt-and-pepper noise (RobustKD).", low=0, high=1)
    ce_weight: float = option(0.0, "Weight of an extra cross-entropy term on the labels (PM-AFL).",
                              low=0)
    attack_loss: str = option("ce", "Loss the PM-AFL training attack maximises: `ce` (labels), `cw` "
                              "(margin) or `kl` (to the teacher's probabilities).",
                              choices=tuple(ATTACK_LOSSES))
    eps: float = option(0.2, "L_inf attack radius, for training and evaluation (inputs in [0, 1]).",
                        low=0, auto=True)
    train_attack: str = option("pgd", "Attack of local training: `pgd` (PGD-K, step eps * "
                               "pgd-step-ratio, random start) or `fgsm-rs` (one step of 1.25 eps "
                               "from a random start, Wong et al. 2020).", choices=TRAIN_ATTACKS,
                               auto=True)
    pgd_step_ratio: float = option(0.25, "Step of the training PGD as a fraction of eps.",
                                   low=0, high=1, low_open=True)
    pgd_steps: int = option(10, "PGD steps K for training adversarial examples.", low=1)
    fair_q: float = option(0.0, "q-FFL fairness (Li et al. 2020): each node also reports "
                           "`global-loss`, the adversarial cross-entropy of the global model it "
                           "received on its data (one more training-attack pass over its data "
                           "per round), and the server multiplies its weight in the mean by "
                           "(global-loss / the round's lower median)^q, the factor at most "
                           "`weight-cap` and no weight above the largest capped one (at the "
                           "default cap 1 the better-served half of the nodes weighs less, none "
                           "more). Needs aggregation `mean`. 0: off (FedAvg). At q = 5 it did "
                           "not lift the worst node on Fashion-MNIST (docs/fashion-mnist.md).",
                           low=0)
    update_compression: str = option("none", "What a client sends back (`pmafl.compression`): "
                                     "`none` (its model, float32); `fp16` (its update, the "
                                     "difference from the global model, in float16); `int8` (the "
                                     "update quantised to 8 bits per tensor); `topk` (the "
                                     "`topk-fraction` largest entries of each tensor's update). "
                                     "The lossy ones keep what they drop for the next round "
                                     "(error feedback).", choices=COMPRESSIONS)
    topk_fraction: float = option(0.1, "Share of each tensor's update entries `topk` sends.",
                                  low=0, high=1, low_open=True)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "train config") -> TrainConfig:
        """Validate a flat mapping (a ConfigRecord's items); Flower's `server-round` and FedFTG's
        request for label counts are ignored."""
        return _build(cls, values, where, ignore=(SERVER_ROUND, LABEL_COUNTS))

    def to_record(self) -> dict[str, Any]:
        """Flat `key: value` mapping, ready for a Flower ConfigRecord."""
        return {_key(k): v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs beyond local training: federation, data, models, output."""

    num_server_rounds: int = option(30, "Federated rounds.", low=1)
    fraction_train: float = option(1.0, "Fraction of connected nodes sampled each round.",
                                   low=0, high=1, low_open=True)
    min_train_nodes: int = option(2, "Fewest nodes trained per round, and the fewest valid replies "
                                  "that make a round count.", low=1)
    min_available_nodes: int = option(2, "Nodes that must be connected before a round starts.", low=1)
    federated_eval_every: int = option(5, "Federated evaluation (each node, clean and PGD on its "
                                       "local test split; mean and worst node) every N rounds "
                                       "and in the last round; 0: off.", low=0)
    fraction_evaluate: float = option(1.0, "Fraction of connected nodes sampled for federated "
                                      "evaluation.", low=0, high=1, low_open=True)
    round_timeout: float = option(600.0, "Seconds the server waits for replies in a round.",
                                  low=0, low_open=True)
    aggregation: str = option("mean", "How the server aggregates the updates: `mean` (FedAvg, "
                              "example-weighted), `trimmed-mean` or `median` (coordinate-wise, "
                              "unweighted; robust to a minority of malicious updates).",
                              choices=AGGREGATIONS)
    trim_fraction: float = option(0.2, "Share of the updates `trimmed-mean` cuts from each end, per "
                                  "coordinate.", low=0, high=0.49)
    clip_factor: float = option(2.0, "Norm-bounded updates: scale each client's update down to at "
                                "most this many times the round's median update norm (0: off).",
                                low=0)
    weight_cap: float = option(1.0, "A node's weight in the mean is its `num-examples`, at most this "
                               "many times the round's median claim (0: uncapped); it bounds "
                               "`fair-q`'s factors too.", low=0)
    node_wait_timeout: float = option(3600.0, "Seconds the server waits for `min-available-nodes` "
                                      "connected nodes before a round; then the run stops with "
                                      "an error (its checkpoint intact).", low=0, low_open=True)
    max_idle_rounds: int = option(3, "Stop the run after this many rounds in a row with fewer "
                                  "than `min-train-nodes` valid replies (such a round leaves the "
                                  "global model as it was).", low=1)
    max_missed_rounds: int = option(2, "A node with no usable reply (none in time, an error, or "
                                    "one left out) in this many of its rounds in a row is not "
                                    "sampled for `skip-rounds` rounds (0: never skipped).", low=0)
    skip_rounds: int = option(3, "Rounds a node that missed `max-missed-rounds` rounds in a row "
                              "is not sampled.", low=1)
    dataset: str = option("digits", "Dataset: `digits` (scikit-learn, offline), "
                          "`fashion-mnist` (Debian's `dataset-fashion-mnist`, offline, or "
                          "`data-dir`), `cifar10`, `cifar100`, `svhn` (from `data-dir`).",
                          choices=DATASETS)
    data_dir: str = option("", "Folder holding downloaded datasets; empty: ~/.cache/pmafl/data.")
    download: bool = option(False, "Download a missing dataset (needs the network).")
    public_fraction: float = option(0.3, "Fraction of the training split kept public to pre-train "
                                    "the teacher; clients never see it.", low=0, high=1,
                                    low_open=True, auto=True)
    max_train_examples: int = option(0, "Client pool size: a class-stratified subset of the rest of "
                                     "the training split, partitioned among the clients (0: all).",
                                     low=0, auto=True)
    eval_examples: int = option(0, "Test images of the per-round evaluation (a fixed "
                                "class-stratified subset; 0: the whole test split); nodes' local "
                                "test splits are drawn from them.", low=0, auto=True)
    partitioner: str = option("dirichlet", "How client partitions are drawn (flwr-datasets).",
                              choices=PARTITIONERS)
    dirichlet_alpha: float = option(0.5, "Dirichlet concentration (smaller: more non-IID).",
                                    low=0, low_open=True)
    classes_per_partition: int = option(2, "Classes per client for the pathological partitioner.",
                                        low=1)
    batch_size: int = option(32, "Local and evaluation batch size.", low=1)
    seed: int = option(0, "Seed of partitions, initial model and local training.", low=0)
    model: str = option("cnn-small", "Student / global model, by registry name.")
    teacher_model: str = option("cnn-large", "Teacher architecture, by registry name "
                                "(`torchvision/<name>` for torchvision models).")
    teacher_cache_dir: str = option("", "Teacher cache folder; empty: ~/.cache/pmafl/teachers. "
                                    "A node's `teacher-cache-dir` node-config key overrides it.")
    teacher_sha256: str = option("", "Expected sha256 of the cached teacher file; empty accepts "
                                 "the checksum recorded in the cache.")
    teacher_objective: str = option("pgd-at", "How a missing teacher is pre-trained on the public "
                                    "split: `ce` or `pgd-at`.", choices=("ce", "pgd-at"))
    teacher_attack: str = option("pgd", "Attack of teacher pre-training: `pgd` (PGD-10, step eps/4) "
                                 "or `fgsm-rs`.", choices=TRAIN_ATTACKS, auto=True)
    teacher_epochs: int = option(60, "Epochs of teacher pre-training.", low=1, auto=True)
    backdoor_rate: float = option(0.0, "Plant a BadNets backdoor in the teacher, for experiments: "
                                  "the share of the public split stamped with the trigger and "
                                  "relabelled `backdoor-target` at pre-training (0: a clean "
                                  "teacher). Runs with a trigger also report its attack success "
                                  "rate (ASR).", low=0, high=0.5)
    backdoor_client_rate: float = option(0.0, "Share of every client's training images stamped "
                                         "with the backdoor trigger, true labels kept (the threat "
                                         "under which a teacher's backdoor reaches a distilled "
                                         "student; 0: clean client data).", low=0, high=0.5)
    backdoor_target: int = option(0, "Target class of the backdoor (all-to-one).", low=0)
    backdoor_patch: int = option(3, "Side in pixels of the square trigger.", low=1)
    backdoor_value: float = option(1.0, "Pixel value of the trigger (1: white).", low=0, high=1)
    backdoor_position: str = option("bottom-right", "Corner of the trigger.", choices=POSITIONS)
    eps_warmup_rounds: int = option(0, "Ramp the training radius linearly from eps/N in round 1 to "
                                    "eps in round N (0: full eps from the start).", low=0)
    eval_steps: int = option(20, "PGD steps of the per-round robust evaluation (step eps/4, random "
                             "start: PGD-20 by default).", low=1)
    results_dir: str = option("results", "Where each run writes its results folder (relative "
                              "paths resolve against the app folder).")
    resume_from: str = option("", "Results folder of an interrupted run (continue after its "
                              "newest checkpoint), or one of its checkpoint files "
                              "(`checkpoint-round<N>.pt`: continue after round N), with the same "
                              "run config otherwise.")
    keep_checkpoints: int = option(3, "Checkpoints a run keeps: those of its last this many rounds.",
                                   low=1)
    device: str = option("auto", "`auto` (CUDA when present), `cpu` or `cuda`.", choices=DEVICES)
    server_finetune: str = option("off", "Server-side fine-tuning of every round's aggregate: "
                                  "`off`; `fedftg` (FedFTG: data-free distillation from the "
                                  "round's client models through a conditional generator); "
                                  "`fedftg-robust` (FedFTG, distilling on adversarial versions of "
                                  "the synthetic images too).", choices=("off", *VARIANTS))
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"doc": None})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "run config") -> RunConfig:
        """Validate Flower's flat run config; keys of `TrainConfig` go to `.train`; keys that are
        "auto" (or absent) take the dataset's value from `DATASET_DEFAULTS`."""
        values = resolve_auto(values, where)
        train_keys = {_key(f.name) for f in dataclasses.fields(TrainConfig)}
        train = TrainConfig.from_mapping({k: v for k, v in values.items() if k in train_keys}, where)
        own = {k: v for k, v in values.items() if k not in train_keys}
        if "train" in own:
            raise ConfigError(f"{where} key 'train' is unknown")
        cfg = _build(cls, own, where)
        cfg = dataclasses.replace(cfg, train=train)
        if cfg.train.attack_loss == "kl" and not needs_teacher(cfg.train.objective):
            raise ConfigError(f"{where} key 'attack-loss': 'kl' needs an objective that distils "
                              f"from the teacher, got objective {cfg.train.objective!r}")
        if cfg.server_finetune == "fedftg-robust" and cfg.train.eps <= 0:
            raise ConfigError(f"{where} key 'server-finetune': 'fedftg-robust' attacks within eps, "
                              "which is 0")
        for add_on in active_add_ons(cfg.train).values():
            if not needs_teacher(cfg.train.objective):
                raise ConfigError(f"{where} key '{_key(add_on.weight)}': {add_on.doc} needs an "
                                  f"objective that distils from the teacher, got objective "
                                  f"{cfg.train.objective!r}")
        for key, name in (("model", cfg.model), ("teacher-model", cfg.teacher_model)):
            if not is_known_model(name):
                raise ConfigError(f"{where} key '{key}': expected one of {', '.join(model_names())}, "
                                  f"got {name!r}")
            if cfg.train.robustkd_weight > 0 and name not in FEATURE_STAGES:
                raise ConfigError(f"{where} key '{key}': robustkd-weight needs a model whose "
                                  f"feature stages are known ({', '.join(FEATURE_STAGES)}), got {name!r}")
        if cfg.train.fair_q > 0 and cfg.aggregation != "mean":
            raise ConfigError(f"{where} key 'fair-q': q-FFL weights the mean, so it needs "
                              f"aggregation 'mean', got {cfg.aggregation!r}")
        if cfg.train.fair_q > 0 and cfg.weight_cap <= 0:
            raise ConfigError(f"{where} key 'fair-q': weight-cap bounds q-FFL's factors, so it "
                              f"needs weight-cap > 0, got {cfg.weight_cap!r}")
        if cfg.min_available_nodes < cfg.min_train_nodes:
            raise ConfigError(f"{where} key 'min-available-nodes': expected >= min-train-nodes "
                              f"({cfg.min_train_nodes}), got {cfg.min_available_nodes}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Flat run-config mapping (as it would appear in pyproject), for results.json."""
        flat = {_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "train"}
        return {**flat, **self.train.to_record()}


def auto_keys() -> list[str]:
    """The run-config keys whose default is "auto": resolved per dataset."""
    return [_key(f.name) for cls in (RunConfig, TrainConfig) for f in dataclasses.fields(cls)
            if f.metadata.get("auto")]


def resolve_auto(values: Mapping[str, Any], where: str = "run config") -> dict[str, Any]:
    """`values` with every "auto" (or absent) auto key replaced by the dataset's value."""
    dataset = values.get("dataset", RunConfig.dataset)
    if dataset not in DATASET_DEFAULTS:
        raise ConfigError(f"{where} key 'dataset': expected one of "
                          f"{', '.join(repr(d) for d in DATASETS)}, got {dataset!r}")
    resolved = dict(values)
    for key in auto_keys():
        if resolved.get(key, AUTO) == AUTO:
            resolved[key] = DATASET_DEFAULTS[dataset][key]
    return resolved


def documented_fields() -> list[tuple[str, Any, str]]:
    """(key, default, doc) for every run-config key, in the order of docs/configuration.md; an
    auto key's default is "auto" and its doc ends with each dataset's value."""
    rows = []
    for cls in (RunConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            if not f.metadata.get("doc"):
                continue
            key, default, doc = _key(f.name), f.default, f.metadata["doc"]
            if f.metadata["auto"]:
                default = AUTO
                by_value: dict[Any, list[str]] = {}
                for name, values in DATASET_DEFAULTS.items():
                    by_value.setdefault(values[key], []).append(name)
                doc += " `auto`: " + "; ".join(f"`{value}` on {', '.join(names)}"
                                              for value, names in by_value.items()) + "."
            rows.append((key, default, doc))
    return rows


def documented_defaults() -> dict[str, Any]:
    """Every run-config key's default as pyproject.toml states it ("auto" for auto keys)."""
    return {key: default for key, default, _ in documented_fields()}


def markdown_table() -> str:
    """The run-config table of docs/configuration.md, generated from the dataclasses."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, doc in documented_fields():
        shown = f'"{default}"' if isinstance(default, str) else str(default).lower() \
            if isinstance(default, bool) else repr(default)
        lines.append(f"| `{key}` | `{shown}` | {doc} |")
    return "\n".join(lines)


def parse_overrides(items: list[str], where: str = "--run-config") -> dict[str, Any]:
    """Run-config overrides in `flwr run --run-config` syntax: each item holds `key=value` pairs
    separated by spaces, values in TOML (strings quoted: `dataset='fashion-mnist' eps=0.1`)."""
    pairs = [pair for item in items for pair in re.findall(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)", item)]
    try:
        return tomllib.loads("\n".join(f'"{key}" = {value}' for key, value in pairs))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: values use TOML syntax (strings in quotes): {e}") from e
