"""From a `RunConfig` to the objects a run works with: device, data, models, a client's share.

The ServerApp and ClientApp call these; so can any script (see `tests/test_plugin.py`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from pmafl.config import RunConfig
from pmafl.data import FederatedData, Split, load_dataset, local_test_indices, partition_indices
from pmafl.models import Normalized, create_model
from pmafl.teacher import ensure_teacher, teacher_path


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The torch seed of one client's local training in one round: two runs with one seed train
    identically, whichever process serves which node."""
    return seed * 1_000_003 + server_round * 1009 + partition_id


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but CUDA is not available on this node")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def load_data(cfg: RunConfig) -> FederatedData:
    return load_dataset(cfg.dataset, cfg.data_dir, cfg.download, cfg.public_fraction)


def build_model(cfg: RunConfig, data: FederatedData) -> Normalized:
    return create_model(cfg.model, data.num_classes, data.in_channels, data.mean, data.std)


@functools.lru_cache(maxsize=64)
def client_split(cfg: RunConfig, data: FederatedData, partition_id: int, num_partitions: int) -> Split:
    """A client's share of the pool (cached: the partitioner runs once per process, not per round)."""
    index = partition_indices(data.pool.labels.numpy(), num_partitions, partition_id,
                              cfg.partitioner, cfg.dirichlet_alpha, cfg.classes_per_partition, cfg.seed)
    return data.pool.subset(index)


@functools.lru_cache(maxsize=64)
def client_test_split(cfg: RunConfig, data: FederatedData, partition_id: int,
                      num_partitions: int) -> Split:
    """A client's local test split: drawn from the held-out test split with the class proportions
    of the client's partition; 1/num_partitions of the test split, at least 100 images."""
    train_labels = client_split(cfg, data, partition_id, num_partitions).labels.numpy()
    size = max(len(data.test) // num_partitions, min(len(data.test), 100))
    index = local_test_indices(data.test.labels.numpy(), train_labels, data.num_classes, size,
                               client_seed(cfg.seed, 0, partition_id))
    return data.test.subset(index)


@functools.lru_cache(maxsize=4)
def _cached_teacher(path: Path, data: FederatedData, cfg: RunConfig,
                    device: torch.device) -> tuple[nn.Module, str]:
    return ensure_teacher(path, data, cfg.dataset, cfg.teacher_model, cfg.teacher_objective,
                          cfg.teacher_epochs, cfg.train.eps, cfg.train.pgd_step,
                          cfg.teacher_sha256, device)


def get_teacher(cfg: RunConfig, data: FederatedData, cache_dir: str = "",
                device: torch.device | None = None) -> tuple[nn.Module, str]:
    """The verified cached teacher (pre-trained first when absent), loaded once per process."""
    path = teacher_path(cache_dir or cfg.teacher_cache_dir, cfg.dataset, cfg.teacher_model)
    return _cached_teacher(path, data, cfg, device or torch.device("cpu"))
