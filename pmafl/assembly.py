"""Run assembly: from a `RunConfig` to the objects a run works with (device, data, models, a
node's share of the pool and its local test split, seeds, the backdoor trigger, FedFTG's server).

The ServerApp and ClientApp call these; so can any script (see `tests/test_plugin.py`). The
teacher's life (settings, cache, pre-training, vetting) is `pmafl.teacher`'s.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass

import torch

from pmafl.backdoor import Trigger, poison
from pmafl.config import ConfigError, RunConfig
from pmafl.data import (
    SPLIT_SEED,
    FederatedData,
    Split,
    evaluation_subset,
    load_dataset,
    local_test_indices,
    partition_indices,
)
from pmafl.fedftg import FedFTGConfig, FedFTGServer
from pmafl.models import Normalized, create_model

log = logging.getLogger(__name__)


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The torch seed of one client's local training in one round: two runs with one seed train
    identically, whichever process serves which node."""
    return seed * 1_000_003 + server_round * 1009 + partition_id


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but CUDA is not available on this node (in "
                           "the Ray simulation a client sees a GPU only with client-resources-num-gpus"
                           " > 0 in --federation-config)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def load_data(cfg: RunConfig) -> FederatedData:
    return load_dataset(cfg.dataset, cfg.data_dir, cfg.download, cfg.public_fraction,
                        cfg.max_train_examples)


def eval_split(cfg: RunConfig, data: FederatedData) -> Split:
    """The test images of the per-round evaluation: `eval-examples` of the test split, a fixed
    class-stratified subset (the whole split when 0 or larger)."""
    return evaluation_subset(data.test, cfg.eval_examples)


def build_model(cfg: RunConfig, data: FederatedData | NodeData) -> Normalized:
    return create_model(cfg.model, data.num_classes, data.in_channels, data.mean, data.std)


@functools.lru_cache(maxsize=64)
def client_split(cfg: RunConfig, data: FederatedData, partition_id: int, num_partitions: int) -> Split:
    """A client's share of the pool (cached: the partitioner runs once per process, not per round).
    With `backdoor-client-rate` > 0, that share of its images carries the trigger (labels kept)."""
    index = partition_indices(data.pool.labels.numpy(), num_partitions, partition_id,
                              cfg.partitioner, cfg.dirichlet_alpha, cfg.classes_per_partition, cfg.seed)
    split = data.pool.subset(index)
    if cfg.backdoor_client_rate == 0:
        return split
    images, labels, _ = poison(split.images, split.labels, backdoor_trigger(cfg, data),
                               cfg.backdoor_client_rate, client_seed(cfg.seed, 0, partition_id),
                               relabel=False)
    return Split(images, labels)


@functools.lru_cache(maxsize=64)
def client_test_split(cfg: RunConfig, data: FederatedData, partition_id: int,
                      num_partitions: int) -> Split:
    """A client's local test split: drawn from the evaluation images (`eval_split`) with the class
    proportions of the client's partition; 1/num_partitions of them, at least 100 images."""
    test = eval_split(cfg, data)
    train_labels = client_split(cfg, data, partition_id, num_partitions).labels.numpy()
    size = max(len(test) // num_partitions, min(len(test), 100))
    index = local_test_indices(test.labels.numpy(), train_labels, data.num_classes, size,
                               client_seed(cfg.seed, 0, partition_id))
    return test.subset(index)


@dataclass(frozen=True)
class NodeData:
    """What one node trains and evaluates on: its partition of the pool, its local test split, and
    the dataset's facts a model is built from. A few hundred kB: small enough for a node to keep
    in its state between rounds (see the ClientApp)."""

    train: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]


def node_data(cfg: RunConfig, partition_id: int, num_partitions: int) -> NodeData:
    """Node `partition_id`'s `NodeData`, from the dataset and the run's partitioning."""
    data = load_data(cfg)
    return NodeData(client_split(cfg, data, partition_id, num_partitions),
                    client_test_split(cfg, data, partition_id, num_partitions), data.num_classes,
                    data.mean, data.std)


def node_data_key(cfg: RunConfig, partition_id: int, num_partitions: int) -> str:
    """Everything that decides a node's `NodeData`, as one string: a kept copy is reused only
    when it matches."""
    trigger = backdoor_trigger(cfg)
    return json.dumps({"dataset": cfg.dataset, "data-dir": cfg.data_dir,
                       "public-fraction": cfg.public_fraction,
                       "max-train-examples": cfg.max_train_examples, "partitioner": cfg.partitioner,
                       "dirichlet-alpha": cfg.dirichlet_alpha,
                       "classes-per-partition": cfg.classes_per_partition, "seed": cfg.seed,
                       "eval-examples": cfg.eval_examples, "split-seed": SPLIT_SEED,
                       "backdoor-client-rate": cfg.backdoor_client_rate,
                       "trigger": trigger.to_dict() if trigger else None,
                       "partition": [partition_id, num_partitions]}, sort_keys=True)


def backdoor_trigger(cfg: RunConfig, data: FederatedData | None = None) -> Trigger | None:
    """The run's backdoor trigger: None when neither the teacher (`backdoor-rate`) nor the
    clients' data (`backdoor-client-rate`) carries one."""
    if cfg.backdoor_rate == 0 and cfg.backdoor_client_rate == 0:
        return None
    if data is not None and cfg.backdoor_target >= data.num_classes:
        raise ConfigError(f"run config key 'backdoor-target': expected a class in [0, "
                          f"{data.num_classes}), got {cfg.backdoor_target}")
    if data is not None and cfg.backdoor_patch > min(data.test.images.shape[-2:]):
        raise ConfigError(f"run config key 'backdoor-patch': expected at most the image side "
                          f"{min(data.test.images.shape[-2:])}, got {cfg.backdoor_patch}")
    return Trigger(cfg.backdoor_target, cfg.backdoor_patch, cfg.backdoor_value, cfg.backdoor_position)


def build_fedftg(cfg: RunConfig, data: FederatedData, device: torch.device | None = None
                 ) -> FedFTGServer:
    """The server side of FedFTG for `server-finetune` (its generator seeded by the run's seed;
    the robust variant attacks with the run's training attack)."""
    return FedFTGServer(data.num_classes, data.in_channels, data.test.images.shape[-1],
                        FedFTGConfig(robust=cfg.server_finetune == "fedftg-robust"),
                        seed=cfg.seed, device=device, attack_config=cfg.train)
