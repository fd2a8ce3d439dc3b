"""A run's teacher: prepared before the run (found in the cache, else pre-trained there; vetted
when RobustKD needs it), then loaded once per process by every node, verified.
"""

from __future__ import annotations

import functools
import logging
import statistics
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

from pmafl.assembly import backdoor_trigger, eval_split
from pmafl.config import RunConfig
from pmafl.data import SPLIT_SEED, FederatedData
from pmafl.robustkd import (
    ANOMALY_THRESHOLD,
    MAX_NORM_RATIO,
    OUTLIER_NORM_RATIO,
    VET_IMAGES,
    VET_STEPS,
    norm_ratio,
    vet,
)
from pmafl.teacher.cache import (
    TeacherError,
    load_detoxified,
    load_teacher,
    read_record,
    teacher_path,
    write_vet,
)
from pmafl.teacher.pretrain import ensure_teacher
from pmafl.teacher.settings import TeacherSettings

log = logging.getLogger(__name__)


def prepare_teacher(cfg: RunConfig, data: FederatedData, cache_dir: str = "",
                    device: torch.device | None = None) -> tuple[nn.Module, str, Path]:
    """The run's teacher from the cache, pre-trained there first when absent (a long job: the
    ServerApp and `pmafl-teacher pretrain` call this before any round); with its sha256 and path."""
    backdoor_trigger(cfg, data)  # a target class out of range stops here, before training
    settings = TeacherSettings.from_run_config(cfg)
    path = teacher_path(cache_dir or cfg.teacher_cache_dir, settings)
    teacher, sha256 = ensure_teacher(path, data, settings, eval_split(cfg, data), cfg.teacher_sha256,
                                     device or torch.device("cpu"))
    if cfg.train.robustkd_weight > 0:
        ensure_vet(path, teacher, cfg.teacher_model, data)
    return teacher, sha256, path


def ensure_vet(path: Path, teacher: nn.Module, model_name: str, data: FederatedData,
               again: bool = False, steps: int = VET_STEPS) -> dict:
    """The vet record of the teacher at `path` (RobustKD's detection and detoxification, written
    beside it), vetting it first when it has none (or `again`): Neural Cleanse with `steps` steps
    per class on the public split's first `VET_IMAGES` images, which every node's copy of the
    dataset holds, so that any node computes the same record."""
    with FileLock(str(path) + ".lock"):
        vet_record = read_record(path.with_suffix(".json")).get("vet")
        if vet_record is None or again:
            log.info("teacher %s: vetting it (Neural Cleanse over %d classes, %d steps each)",
                     path.name, data.num_classes, steps)
            images = data.public.tensors()[0][:VET_IMAGES].to(next(teacher.parameters()).device)
            vet_record = write_vet(path, vet(teacher, model_name, images, steps, seed=SPLIT_SEED))
            log.info("teacher %s: %s", path.name, vet_summary(vet_record))
    return vet_record


def vet_summary(record: dict) -> str:
    """One line on a vet record."""
    norms = record["norms"]
    evidence = (f"class {record['target']} needs a {min(norms):.1f}-pixel trigger, "
                f"{norm_ratio(norms):.2f}x the median class's {statistics.median(norms):.1f}, anomaly "
                f"index {record['anomaly_index']:.2f} (flagged at most {MAX_NORM_RATIO:g}x with an "
                f"index above {ANOMALY_THRESHOLD:g}, or at most {OUTLIER_NORM_RATIO:g}x)")
    if record["backdoored"]:
        return (f"looks BACKDOORED: {evidence}; {len(record['channels'])} channels of "
                f"{record['stage']} masked")
    return f"looks clean: {evidence}; nothing masked"


@functools.lru_cache(maxsize=4)
def _cached_teacher(path: Path, num_classes: int, cfg: RunConfig,
                    device: torch.device) -> tuple[nn.Module, str]:
    if not path.is_file():
        raise TeacherError(
            f"no teacher for this run's settings at {path}: pre-train it before the run with "
            f"`pmafl-teacher pretrain --run-config \"...\"` (the run's config), or seed it with "
            "`pmafl-teacher import FILE --cache-dir DIR`")
    teacher, sha256 = load_teacher(path, num_classes, cfg.teacher_sha256, device,
                                   TeacherSettings.from_run_config(cfg))
    if cfg.train.robustkd_weight > 0:
        teacher, record = load_detoxified(path, teacher)
        sha256 = f"{sha256}+vet:{record['sha256']}"
    return teacher, sha256


def get_teacher(cfg: RunConfig, num_classes: int, cache_dir: str = "",
                device: torch.device | None = None) -> tuple[nn.Module, str]:
    """The node's verified cached teacher, loaded once per process, and its sha256. It is never
    pre-trained here, inside a round's timeout: a missing one is an error that says how to
    prepare it. With `robustkd-weight` > 0 it is the detoxified teacher (its recorded vet), and the
    checksum covers the vet file too."""
    path = teacher_path(cache_dir or cfg.teacher_cache_dir, TeacherSettings.from_run_config(cfg))
    return _cached_teacher(path, num_classes, cfg, device or torch.device("cpu"))
