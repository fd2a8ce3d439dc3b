"""The local teacher cache: pre-trained teachers stored with a recorded sha256, verified on load.

A cache folder holds `<dataset>--<model>.pt` (the state dict) beside `<dataset>--<model>.json`
(sha256 of the .pt file, architecture, classes, normalisation, how it was trained). `load_teacher`
refuses a missing file, a file whose checksum differs from the record (tampered or corrupt), a
checksum other than the one a run expects, and a teacher with the wrong number of classes.
`ensure_teacher` pre-trains a missing teacher on the dataset's public split, under a file lock so
that simulated clients sharing one cache build it once.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import nn

from pmafl.config import TrainConfig
from pmafl.data import FederatedData, make_loader
from pmafl.evaluate import evaluate
from pmafl.files import cache_root, file_sha256, write_atomic
from pmafl.models import create_model
from pmafl.train import pmafl_train

log = logging.getLogger(__name__)


class TeacherError(RuntimeError):
    """The cached teacher is missing, tampered with, or does not fit the run."""


def cache_folder(cache_dir: str | Path = "") -> Path:
    """The teacher cache folder: `cache_dir`, or by default ~/.cache/pmafl/teachers."""
    return Path(cache_dir).expanduser() if cache_dir else cache_root() / "teachers"


def teacher_path(cache_dir: str | Path, dataset: str, model: str) -> Path:
    return cache_folder(cache_dir) / f"{dataset}--{model.replace('/', '_')}.pt"


def save_teacher(model: nn.Module, path: Path, meta: dict[str, Any]) -> str:
    """Store `model`'s state dict at `path` with its metadata; return the file's sha256.

    `meta` needs `model`, `num_classes`, `in_channels`, `mean` and `std` (to rebuild it)."""
    write_atomic(path, lambda f: torch.save(model.state_dict(), f))
    return write_record(path, meta)


def copy_teacher(source: Path, path: Path, meta: dict[str, Any]) -> str:
    """Store the exact bytes of the teacher file `source` at `path` with its metadata; return the
    sha256, which is then the same on every node seeded from that file."""
    write_atomic(path, lambda f: f.write(source.read_bytes()))
    return write_record(path, meta)


def write_record(path: Path, meta: dict[str, Any]) -> str:
    """The `.json` record beside the teacher file `path`: `meta` plus its sha256."""
    sha256 = file_sha256(path)
    record = {**meta, "sha256": sha256, "file": path.name}
    write_atomic(path.with_suffix(".json"), lambda f: f.write(json.dumps(record, indent=2).encode()))
    return sha256


def load_teacher(path: str | Path, num_classes: int, expected_sha256: str = "",
                 device: str | torch.device = "cpu") -> tuple[nn.Module, str]:
    """The verified teacher in eval mode without gradients, and its sha256."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file():
        raise TeacherError(f"teacher file {path} is missing")
    if not meta_path.is_file():
        raise TeacherError(f"teacher record {meta_path} is missing: the cache cannot verify {path.name}")
    meta = json.loads(meta_path.read_text())
    sha256 = file_sha256(path)
    if sha256 != meta.get("sha256"):
        raise TeacherError(f"teacher file {path} has sha256 {sha256} but the cache recorded "
                           f"{meta.get('sha256')}: the file was modified or is corrupt")
    if expected_sha256 and sha256 != expected_sha256:
        raise TeacherError(f"teacher file {path} has sha256 {sha256}, the run expects "
                           f"{expected_sha256} (run-config key 'teacher-sha256')")
    if meta.get("num_classes") != num_classes:
        raise TeacherError(f"teacher file {path} predicts {meta.get('num_classes')} classes, "
                           f"the dataset has {num_classes}")
    model = create_model(meta["model"], num_classes, meta["in_channels"], meta["mean"], meta["std"])
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (RuntimeError, KeyError) as e:
        raise TeacherError(f"teacher file {path} does not fit architecture {meta['model']!r}: {e}") from e
    return model.to(device).eval().requires_grad_(False), sha256


def pretrain_teacher(data: FederatedData, model_name: str, objective: str, epochs: int,
                     eps: float, pgd_step: float, batch_size: int = 64, seed: int = 0,
                     device: str | torch.device = "cpu") -> nn.Module:
    """Train a teacher on the public split with `pmafl_train` (objective `ce` or `pgd-at`).

    The attack radius ramps up linearly over the first third of the epochs: adversarial training
    at the full radius from a random start does not get off the ground on small data."""
    torch.manual_seed(seed)
    model = create_model(model_name, data.num_classes, data.in_channels, data.mean, data.std).to(device)
    loader = make_loader(*data.public.tensors(), batch_size=batch_size, shuffle=True, seed=seed)
    start = time.time()
    for epoch in range(1, epochs + 1):
        ramp = min(1.0, epoch / max(1.0, epochs / 3))
        # No gradient clipping: plain (adversarial) cross-entropy training does not diverge here.
        config = TrainConfig(objective=objective, local_epochs=1, lr=0.05, momentum=0.9,
                             weight_decay=5e-4, grad_clip=0.0, eps=eps * ramp,
                             pgd_step=pgd_step * ramp, pgd_steps=10)
        metrics = pmafl_train(model, None, loader, config)
        if epoch % 10 == 0 or epoch == epochs:
            log.info("teacher pre-training (%s, %s): epoch %d/%d, loss %.3f, %.0fs", model_name,
                     objective, epoch, epochs, metrics["loss"], time.time() - start)
    return model.eval()


def ensure_teacher(path: Path, data: FederatedData, dataset: str, model_name: str, objective: str,
                   epochs: int, eps: float, pgd_step: float, expected_sha256: str = "",
                   device: str | torch.device = "cpu") -> tuple[nn.Module, str]:
    """Load the cached teacher at `path`, pre-training and caching it first when absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            log.info("teacher cache: %s absent, pre-training it on the public split (%d images)",
                     path, len(data.public))
            model = pretrain_teacher(data, model_name, objective, epochs, eps, pgd_step, device=device)
            x, y = data.test.tensors()
            scores = evaluate(model, x, y, eps, pgd_step, steps=20)
            sha256 = save_teacher(model, path, {
                "model": model_name, "dataset": dataset, "num_classes": data.num_classes,
                "in_channels": data.in_channels, "mean": list(data.mean), "std": list(data.std),
                "objective": objective, "epochs": epochs, "eps": eps,
                "test_clean_acc": scores["clean_acc"], "test_pgd_acc": scores["pgd_acc"]})
            log.info("teacher cache: saved %s (sha256 %s), test clean %.3f, PGD-20 %.3f", path,
                     sha256, scores["clean_acc"], scores["pgd_acc"])
    return load_teacher(path, data.num_classes, expected_sha256, device)
