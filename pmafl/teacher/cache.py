"""The local teacher cache: teacher files stored with a recorded sha256, verified on load.

A cache folder holds `<dataset>--<model>--<key>.pt` (the state dict), `<key>` a hash of the
teacher's settings (`TeacherSettings.key`: every setting of its pre-training), beside a `.json`
record (sha256 of the .pt file, the settings, normalisation, test accuracy, pre-training time). A
run with other settings therefore finds another file and never reuses a teacher trained, say, on
images that are now in the client pool. `load_teacher` refuses a missing file, a file whose
checksum differs from the record (tampered or corrupt), a checksum other than the one a run
expects, a record whose settings differ from the run's, and a teacher with the wrong number of
classes.

A vetted teacher (`pmafl-teacher vet`, `pmafl.robustkd.vet`) also has `<name>.vet.pt` beside it:
the detoxification (per-channel mask M and values P at one stage) and the reverse-engineered
trigger, summarised with its sha256 under `vet` in the record; `load_detoxified` verifies it and
wraps the teacher so that every node distils from the same detoxified teacher.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pmafl.data import FederatedData
from pmafl.files import cache_root, file_sha256, write_atomic
from pmafl.models import ModelFileError, create_model, load_weights
from pmafl.robustkd import DetoxifiedTeacher, VetResult
from pmafl.teacher.settings import TeacherSettings


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


def teacher_path(cache_dir: str | Path, settings: TeacherSettings) -> Path:
    """Where the teacher with these settings lives in a cache."""
    return cache_folder(cache_dir) / settings.file_name()


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
                 device: str | torch.device = "cpu", settings: TeacherSettings | None = None
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
    if settings is not None and meta.get("settings") != settings.to_dict():
        wanted, recorded = settings.to_dict(), meta.get("settings") or {}
        differ = sorted(k for k in set(wanted) | set(recorded) if wanted.get(k) != recorded.get(k))
        detail = ", ".join(f"{k}: {recorded.get(k)!r} recorded, {wanted.get(k)!r} wanted" for k in differ)
        raise TeacherError(f"teacher file {path} was trained with other settings than the run's "
                           f"({detail}); pre-train one for this run with `pmafl-teacher pretrain`")
    if meta.get("num_classes") != num_classes:
        raise TeacherError(f"teacher file {path} predicts {meta.get('num_classes')} classes, "
                           f"the dataset has {num_classes}")
    model = create_model(meta["model"], num_classes, meta["in_channels"], meta["mean"], meta["std"])
    try:
        load_weights(model, path, meta["model"], what="teacher file")
    except ModelFileError as e:
        raise TeacherError(str(e)) from e
    return model.to(device).eval().requires_grad_(False), sha256


def teacher_record(data: FederatedData, settings: TeacherSettings) -> dict[str, Any]:
    """The record that rebuilds a teacher with `settings` for `data`: what `save_teacher` needs,
    plus the settings that `load_teacher` checks."""
    return {"model": settings.model, "dataset": settings.dataset,
            "num_classes": data.num_classes, "in_channels": data.in_channels,
            "mean": list(data.mean), "std": list(data.std), "settings": settings.to_dict()}


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
