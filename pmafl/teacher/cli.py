"""pmafl-teacher: pre-train a run's teacher ahead of the run, import a teacher file into a node's
cache, show what a cache holds, or vet a teacher for a backdoor.

    pmafl-teacher pretrain --run-config "dataset='fashion-mnist'"      # as `flwr run` would use it
    pmafl-teacher import teacher.pt --cache-dir /data/teachers          # record beside teacher.pt
    pmafl-teacher import weights.pt --cache-dir DIR --run-config "dataset='digits' teacher-model='cnn-large'"
    pmafl-teacher show --cache-dir /data/teachers
    pmafl-teacher vet ~/.cache/pmafl/teachers/digits--cnn-large--<key>.pt

`pretrain` builds the teacher that a run with the given run config (pyproject defaults otherwise)
looks for, unless the cache already holds it: pre-training takes minutes to a quarter of an hour
and belongs before the run, not inside a round. `import` checks that the file loads into the
architecture, copies it into the cache under the name a run looks for
(`<dataset>--<model>--<settings key>.pt`, with its `.json` record) and prints its sha256: pass
that to the run as `teacher-sha256` so that every node must hold this very file. The teacher's
settings come from the `.json` record beside the file (as written by another cache) or, for bare
weights, from `--run-config` (the run the teacher is meant for).

`vet` checks a cached teacher for a backdoor (RobustKD's detection: Neural Cleanse over every
class, then the MAD outlier test), prints whether it looks backdoored, the suspected target class
and the feature channels it masks, and writes that detoxification beside the teacher
(`<name>.vet.pt`, its sha256 under `vet` in the record). Runs with `robustkd-weight` > 0 distil
from the detoxified teacher; they vet a teacher that has no vet record before round 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from pmafl.assembly import load_data
from pmafl.config import ConfigError, RunConfig, parse_overrides
from pmafl.files import file_sha256, write_atomic
from pmafl.models import ModelFileError, create_model, load_weights
from pmafl.objectives import needs_teacher
from pmafl.robustkd import VET_STEPS
from pmafl.teacher.cache import (
    TeacherError,
    cache_folder,
    copy_teacher,
    load_detoxified,
    load_teacher,
    read_record,
    teacher_path,
    teacher_record,
    vet_path,
)
from pmafl.teacher.prepare import ensure_vet, prepare_teacher, vet_summary
from pmafl.teacher.settings import TeacherSettings


def parse_run_config(items: list[str]) -> RunConfig:
    """A RunConfig from `--run-config` strings in flwr's syntax ("key=value key='text' ..."), on top
    of the defaults, exactly as a run would validate it."""
    return RunConfig.from_mapping(parse_overrides(items), where="--run-config")


def import_teacher(source: Path, cache_dir: str, cfg: RunConfig | None = None) -> tuple[Path, str]:
    """Copy the teacher at `source` into `cache_dir`; return its cache path and sha256. Its
    settings come from the record beside it, else from `cfg` (the run it is meant for)."""
    if not source.is_file():
        raise TeacherError(f"teacher file {source} does not exist")
    record = source.with_suffix(".json")
    meta: dict[str, Any] = read_record(record) if record.is_file() else {}
    if meta and meta.get("sha256") != file_sha256(source):
        raise TeacherError(f"teacher file {source} does not match the sha256 in {record}: the file "
                           "was modified or is corrupt")
    if "settings" not in meta:
        if cfg is None:
            raise TeacherError(f"no record {record} gives the teacher's settings: pass --run-config "
                               "with the run it is for (dataset, teacher-model, ...)")
        data = load_data(cfg)
        meta = teacher_record(data, TeacherSettings.from_run_config(cfg))
    try:
        settings = TeacherSettings.from_dict(meta["settings"], f"teacher record {record}")
    except ValueError as e:
        raise TeacherError(str(e)) from e
    net = create_model(meta["model"], meta["num_classes"], meta["in_channels"], meta["mean"], meta["std"])
    try:
        load_weights(net, source, meta["model"], what="teacher file")
    except ModelFileError as e:
        raise TeacherError(str(e)) from e
    target = teacher_path(cache_dir, settings)
    # A record from before the cache key held every pre-training setting lacks some: they get the
    # defaults, which are what that pre-training used, so the file lands under its current name.
    meta = {**{k: v for k, v in meta.items() if k not in ("sha256", "file")},
            "settings": settings.to_dict()}
    meta["seeded_from"] = str(source.resolve())  # the record's name for it since `import` was `seed`
    if "vet" in meta:  # a vetted teacher travels with its detoxification, checked first
        load_detoxified(source, net)
        write_atomic(vet_path(target), lambda f: f.write(vet_path(source).read_bytes()))
        meta["vet"] = {**meta["vet"], "file": vet_path(target).name}
    sha256 = copy_teacher(source, target, meta)
    # The cache now verifies it like a run does.
    load_teacher(target, meta["num_classes"], sha256, settings=settings)
    return target, sha256


def pretrain(cfg: RunConfig, cache_dir: str) -> tuple[Path, str, dict[str, Any]]:
    """The run's teacher in `cache_dir` (pre-trained when absent): path, sha256, record."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    _, sha256, path = prepare_teacher(cfg, load_data(cfg), cache_dir)
    return path, sha256, read_record(path.with_suffix(".json"))


def vet_file(path: Path, run_config: list[str], steps: int = VET_STEPS) -> dict[str, Any]:
    """Vet the teacher at `path` (again, if it was vetted before) on the public split it was
    trained on (dataset and public fraction from its record; `run_config` may say where the data
    lives). Returns the vet record."""
    record = path.with_suffix(".json")
    if not path.is_file() or not record.is_file():
        raise TeacherError(f"teacher file {path} or its record {record} does not exist")
    meta = read_record(record)
    values = {**parse_overrides(run_config), "dataset": meta["dataset"],
              "public-fraction": meta["settings"]["public_fraction"]}
    data = load_data(RunConfig.from_mapping(values, where="--run-config"))
    teacher, _ = load_teacher(path, data.num_classes)
    return ensure_vet(path, teacher, meta["model"], data, again=True, steps=steps)


def _current_name(meta: dict[str, Any]) -> str | None:
    """The file name a record's settings give today (None when they do not parse)."""
    try:
        return TeacherSettings.from_dict(meta.get("settings"), "record").file_name()
    except (ValueError, TypeError):
        return None


def show(cache_dir: str) -> list[dict[str, Any]]:
    """A row per record in the cache: the file, its sha256, and whether it is `ok`, `TAMPERED`
    (the file's checksum is not the record's), `MISSING FILE`, or under an `OLD NAME` (its
    settings name another file today: a run never finds it; `import` it again)."""
    rows = []
    for record in sorted(cache_folder(cache_dir).glob("*.json")):
        meta = read_record(record)
        pt = record.with_suffix(".pt")
        actual = file_sha256(pt) if pt.is_file() else None
        status = "ok" if actual == meta.get("sha256") else "MISSING FILE" if actual is None else "TAMPERED"
        if status == "ok" and _current_name(meta) != pt.name:
            status = "OLD NAME"
        rows.append({"file": str(pt), "sha256": meta.get("sha256"), "status": status,
                     "dataset": meta.get("dataset"), "model": meta.get("model")})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pmafl-teacher", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)
    cache_help = ("the teacher cache (a node's `teacher-cache-dir`; default: the run config's "
                  "teacher-cache-dir, else ~/.cache/pmafl/teachers)")
    config_help = ("run config in flwr's syntax, e.g. \"dataset='fashion-mnist' eps=0.1\" "
                   "(repeatable; the pyproject defaults otherwise)")
    p_pre = sub.add_parser("pretrain", help="pre-train the teacher a run will use, unless cached")
    p_pre.add_argument("--run-config", action="append", default=[], help=config_help)
    p_pre.add_argument("--cache-dir", default="", help=cache_help)
    p_import = sub.add_parser("import", help="copy a teacher file into a cache and print its sha256")
    p_import.add_argument("file", type=Path)
    p_import.add_argument("--cache-dir", default="", help=cache_help)
    p_import.add_argument("--run-config", action="append", default=None,
                        help="for a file without a record: the run it is for; " + config_help)
    p_show = sub.add_parser("show", help="list a cache's teachers, checksums and integrity (OLD NAME: "
                            "cached under a name runs no longer look for; import it again)")
    p_show.add_argument("--cache-dir", default="")
    p_vet = sub.add_parser("vet", help="check a cached teacher for a backdoor and write its "
                           "detoxification beside it")
    p_vet.add_argument("file", type=Path, help="the teacher file (with its .json record)")
    p_vet.add_argument("--steps", type=int, default=VET_STEPS,
                       help=f"Neural Cleanse steps per class (default {VET_STEPS})")
    p_vet.add_argument("--run-config", action="append", default=[],
                       help="where the teacher's dataset lives (e.g. \"data-dir='...'\"); " + config_help)
    args = parser.parse_args(argv)
    try:
        if args.command == "pretrain":
            cfg = parse_run_config(args.run_config)
            if not needs_teacher(cfg.train.objective):
                print(f"objective {cfg.train.objective!r} uses no teacher: nothing to pre-train")
                return 0
            path, sha256, record = pretrain(cfg, args.cache_dir)
            print(f"Teacher {path}")
            print(f"sha256 {sha256}")
            print(f"on {record['test_examples']} test images: clean {record['test_clean_acc']:.3f}, "
                  f"PGD-20 {record['test_pgd_acc']:.3f} (eps {record['settings']['eps']:g})")
        elif args.command == "import":
            cfg = parse_run_config(args.run_config) if args.run_config is not None else None
            target, sha256 = import_teacher(args.file, args.cache_dir, cfg)
            print(f"Imported {target}")
            print(f"sha256 {sha256}")
            print(f"Runs that must use exactly this teacher: --run-config \"teacher-sha256='{sha256}'\"")
        elif args.command == "vet":
            record = vet_file(args.file, args.run_config, args.steps)
            norms = ", ".join(f"{c}: {n:.1f}" for c, n in enumerate(record["norms"]))
            print(f"Teacher {args.file}")
            print(f"smallest trigger per class (L1 mask norm, pixels): {norms}")
            print(vet_summary(record))
            if record["backdoored"]:
                print(f"masked channels of {record['stage']}: {record['channels']}")
            print(f"written: {args.file.parent / record['file']} (sha256 {record['sha256']})")
        else:
            rows = show(args.cache_dir)
            for row in rows:
                print(f"{row['status']:<12} {row['sha256']}  {row['file']}")
            if not rows:
                print("no teachers in this cache")
    except (TeacherError, ConfigError, FileNotFoundError) as e:
        print(f"pmafl-teacher: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
