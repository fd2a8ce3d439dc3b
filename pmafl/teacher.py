"""The local teacher cache: pre-trained teachers stored with a recorded sha256, verified on load.

A teacher is defined by its settings (dataset, architecture, public split, training objective,
attack, radius, epochs): a cache folder holds `<dataset>--<model>--<key>.pt` (the state dict),
`<key>` a hash of those settings, beside a `.json` record (sha256 of the .pt file, the settings,
normalisation, test accuracy). A run with other settings therefore finds another file and never
reuses a teacher trained, say, on images that are now in the client pool. `load_teacher` refuses a
missing file, a file whose checksum differs from the record (tampered or corrupt), a checksum other
than the one a run expects, a record whose settings differ from the run's, and a teacher with the
wrong number of classes. `ensure_teacher` pre-trains a missing teacher on the dataset's public
split, under a file lock so that processes sharing one cache build it once.

A vetted teacher (`pmafl-teacher vet`, `pmafl.robustkd.vet`) also has `<name>.vet.pt` beside it:
the detoxification (per-channel mask M and values P at one stage) and the reverse-engineered
trigger, summarised with its sha256 under `vet` in the record; `load_detoxified` verifies it and
wraps the teacher so that every node distils from the same detoxified teacher.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import nn

from pmafl.backdoor import Trigger, attack_success_rate, poison
from pmafl.config import TrainConfig
from pmafl.data import FederatedData, Split, make_loader
from pmafl.evaluate import evaluate
from pmafl.files import cache_root, file_sha256, write_atomic
from pmafl.models import create_model
from pmafl.robustkd import DetoxifiedTeacher, VetResult
from pmafl.train import pmafl_train

log = logging.getLogger(__name__)


class TeacherError(RuntimeError):
    """The cached teacher is missing, tampered with, or does not fit the run."""


def read_record(path: Path) -> dict[str, Any]:
    """A teacher's JSON record (`<teacher>.json`); one that is not a readable JSON object is
    refused with an error naming it."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TeacherError(f"teacher record {path} is not readable JSON ({e})") from e
    if not isinstance(record, dict):
        raise TeacherError(f"teacher record {path} is not a JSON object")
    return record


def cache_folder(cache_dir: str | Path = "") -> Path:
    """The teacher cache folder: `cache_dir`, or by default ~/.cache/pmafl/teachers."""
    return Path(cache_dir).expanduser() if cache_dir else cache_root() / "teachers"


def settings_key(settings: dict[str, Any]) -> str:
    """A short hash of a teacher's settings, part of its file name."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def teacher_path(cache_dir: str | Path, settings: dict[str, Any]) -> Path:
    """Where the teacher with these settings lives in a cache (`settings` holds at least
    `dataset` and `model`)."""
    name = f"{settings['dataset']}--{settings['model'].replace('/', '_')}--{settings_key(settings)}.pt"
    return cache_folder(cache_dir) / name


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
                 device: str | torch.device = "cpu", settings: dict[str, Any] | None = None
                 ) -> tuple[nn.Module, str]:
    """The verified teacher in eval mode without gradients, and its sha256. With `settings`, the
    record must hold exactly those settings."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file():
        raise TeacherError(f"teacher file {path} is missing")
    if not meta_path.is_file():
        raise TeacherError(f"teacher record {meta_path} is missing: the cache cannot verify {path.name}")
    meta = read_record(meta_path)
    sha256 = file_sha256(path)
    if sha256 != meta.get("sha256"):
        raise TeacherError(f"teacher file {path} has sha256 {sha256} but the cache recorded "
                           f"{meta.get('sha256')}: the file was modified or is corrupt")
    if expected_sha256 and sha256 != expected_sha256:
        raise TeacherError(f"teacher file {path} has sha256 {sha256}, the run expects "
                           f"{expected_sha256} (run-config key 'teacher-sha256')")
    if settings is not None and meta.get("settings") != settings:
        recorded = meta.get("settings") or {}
        differ = sorted(k for k in set(settings) | set(recorded) if settings.get(k) != recorded.get(k))
        detail = ", ".join(f"{k}: {recorded.get(k)!r} recorded, {settings.get(k)!r} wanted" for k in differ)
        raise TeacherError(f"teacher file {path} was trained with other settings than the run's "
                           f"({detail}); pre-train one for this run with `pmafl-teacher pretrain`")
    if meta.get("num_classes") != num_classes:
        raise TeacherError(f"teacher file {path} predicts {meta.get('num_classes')} classes, "
                           f"the dataset has {num_classes}")
    model = create_model(meta["model"], num_classes, meta["in_channels"], meta["mean"], meta["std"])
    try:
        # weights_only: a file that pickles code (a callable, any object) is refused, never run.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unsafe or unreadable file gets the same answer
        raise TeacherError(f"teacher file {path} is not a plain state dict (tensors only): "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise TeacherError(f"teacher file {path} does not fit architecture {meta['model']!r}: {e}") from e
    return model.to(device).eval().requires_grad_(False), sha256


def settings_trigger(settings: dict[str, Any]) -> Trigger:
    """The backdoor trigger recorded in a backdoored teacher's settings."""
    return Trigger(**{k: v for k, v in settings["backdoor"].items() if k != "rate"})


def pretrain_teacher(data: FederatedData, settings: dict[str, Any], batch_size: int = 64,
                     seed: int = 0, device: str | torch.device = "cpu") -> nn.Module:
    """Train a teacher on the public split with `pmafl_train`: `settings["objective"]` (`ce` or
    `pgd-at`) with `settings["attack"]` (`pgd`: PGD-10, step eps/4; or `fgsm-rs`) at radius
    `settings["eps"]` for `settings["epochs"]` epochs.

    The attack radius ramps up linearly over the first third of the epochs: adversarial training
    at the full radius from a random start does not get off the ground on small data."""
    torch.manual_seed(seed)
    model_name, epochs, eps = settings["model"], settings["epochs"], settings["eps"]
    model = create_model(model_name, data.num_classes, data.in_channels, data.mean, data.std).to(device)
    images, labels = data.public.tensors()
    if "backdoor" in settings:  # an experiment's backdoored teacher: BadNets on the public split
        images, labels, poisoned = poison(images, labels, settings_trigger(settings),
                                          settings["backdoor"]["rate"], seed)
        log.info("teacher pre-training: BACKDOOR planted in %d of %d public images (%s)",
                 len(poisoned), len(labels), settings["backdoor"])
    loader = make_loader(images, labels, batch_size=batch_size, shuffle=True, seed=seed)
    start = time.time()
    for epoch in range(1, epochs + 1):
        ramp = min(1.0, epoch / max(1.0, epochs / 3))
        # No gradient clipping: plain (adversarial) cross-entropy training does not diverge here.
        config = TrainConfig(objective=settings["objective"], local_epochs=1, lr=0.05, momentum=0.9,
                             weight_decay=5e-4, grad_clip=0.0, eps=eps * ramp,
                             train_attack=settings["attack"], pgd_steps=10)
        metrics = pmafl_train(model, None, loader, config)
        log.info("teacher pre-training (%s, %s, %s): epoch %d/%d, loss %.3f, %.0fs", model_name,
                 settings["objective"], settings["attack"], epoch, epochs, metrics["loss"],
                 time.time() - start)
    return model.eval()


def teacher_record(data: FederatedData, settings: dict[str, Any]) -> dict[str, Any]:
    """The record that rebuilds a teacher with `settings` for `data`: what `save_teacher` needs,
    plus the settings that `load_teacher` checks."""
    return {"model": settings["model"], "dataset": settings["dataset"],
            "num_classes": data.num_classes, "in_channels": data.in_channels,
            "mean": list(data.mean), "std": list(data.std), "settings": settings}


def ensure_teacher(path: Path, data: FederatedData, settings: dict[str, Any], test: Split,
                   expected_sha256: str = "", device: str | torch.device = "cpu"
                   ) -> tuple[nn.Module, str]:
    """Load the cached teacher at `path`, pre-training and caching it first when absent; a new
    teacher's clean and PGD-20 accuracy on `test` go into its record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            log.info("teacher cache: %s absent, pre-training it on the public split (%d images)",
                     path, len(data.public))
            model = pretrain_teacher(data, settings, device=device)
            x, y = test.tensors()
            scores = evaluate(model, x, y, settings["eps"], steps=20)
            meta = {**teacher_record(data, settings), "test_examples": len(y),
                    "test_clean_acc": scores["clean_acc"], "test_pgd_acc": scores["pgd_acc"]}
            if "backdoor" in settings:
                meta["test_asr"] = attack_success_rate(model, x, y, settings_trigger(settings))
            sha256 = save_teacher(model, path, meta)
            log.info("teacher cache: saved %s (sha256 %s), on %d test images: clean %.3f, "
                     "PGD-20 %.3f%s", path, sha256, len(y), scores["clean_acc"], scores["pgd_acc"],
                     f", backdoor ASR {meta['test_asr']:.3f}" if "test_asr" in meta else "")
    return load_teacher(path, data.num_classes, expected_sha256, device, settings)


def vet_path(path: Path) -> Path:
    """The vet file beside the teacher file `path`."""
    return path.with_suffix(".vet.pt")


def write_vet(path: Path, result: VetResult) -> dict[str, Any]:
    """Store `result` beside the teacher at `path` (bound to it by the teacher's sha256, which
    the vet file holds) and summarise it, with the vet file's sha256, under `vet` in the
    teacher's record (the teacher's own sha256 stays as it was)."""
    meta_path = path.with_suffix(".json")
    meta = read_record(meta_path)
    sha256 = file_sha256(path)
    if sha256 != meta.get("sha256"):
        raise TeacherError(f"teacher file {path} does not match its record: not vetting it")
    tensors = {"mask": result.mask, "pattern": result.pattern, "trigger_mask": result.trigger_mask,
               "trigger_pattern": result.trigger_pattern, "norms": torch.tensor(result.norms)}
    payload = {"teacher_sha256": sha256, "stage": result.stage,
               **{k: v.detach().cpu() for k, v in tensors.items()}}
    out = vet_path(path)
    write_atomic(out, lambda f: torch.save(payload, f))
    meta["vet"] = {"file": out.name, "sha256": file_sha256(out), "teacher_sha256": sha256,
                   "backdoored": result.backdoored, "anomaly_index": result.anomaly_index,
                   "target": result.target, "norms": [round(n, 3) for n in result.norms],
                   "stage": result.stage, "channels": result.channels}
    write_atomic(meta_path, lambda f: f.write(json.dumps(meta, indent=2).encode()))
    return meta["vet"]


def load_detoxified(path: Path, teacher: nn.Module) -> tuple[DetoxifiedTeacher, dict[str, Any]]:
    """The loaded `teacher` (from the file `path`) wrapped with its recorded detoxification, and
    the record's `vet` summary. Refused: a missing vet record or file, a vet file whose sha256
    differs from the record, or one written for another teacher file."""
    meta = read_record(path.with_suffix(".json"))
    vet = meta.get("vet")
    if vet is None:
        raise TeacherError(f"teacher file {path} has not been vetted (no 'vet' in its record): run "
                           f"`pmafl-teacher vet {path}` before a run with robustkd-weight > 0")
    file = vet_path(path)
    if not file.is_file() or file_sha256(file) != vet.get("sha256"):
        raise TeacherError(f"vet file {file} is missing or does not match the sha256 in "
                           f"{path.with_suffix('.json')}: vet the teacher again")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        if state["teacher_sha256"] != file_sha256(path):
            raise TeacherError(f"vet file {file} was written for another teacher file (sha256 "
                               f"{state['teacher_sha256']}): vet this teacher again")
        detoxified = DetoxifiedTeacher(teacher, state["stage"], state["mask"], state["pattern"])
    except TeacherError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable or unfitting file gets the same answer
        raise TeacherError(f"vet file {file} does not fit the teacher: {type(e).__name__}: {e}") from e
    device = next(teacher.parameters()).device
    return detoxified.to(device).eval().requires_grad_(False), vet
