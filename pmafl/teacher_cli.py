"""pmafl-teacher: put a pre-trained teacher into a node's cache, or show what a cache holds.

    pmafl-teacher seed teacher.pt --cache-dir /data/teachers            # record beside teacher.pt
    pmafl-teacher seed weights.pt --cache-dir DIR --dataset digits --model cnn-large
    pmafl-teacher show --cache-dir /data/teachers

`seed` checks that the file loads into the architecture, copies it into the cache under the name a
run looks for (`<dataset>--<model>.pt`, with its `.json` record) and prints its sha256: pass that
to the run as `teacher-sha256` so that every node must hold this very file. The architecture comes
from the `.json` record beside the file (as written by another node's cache) or from
`--dataset`/`--model`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from pmafl.data import load_dataset
from pmafl.models import create_model
from pmafl.teacher import (
    TeacherError,
    cache_folder,
    copy_teacher,
    file_sha256,
    load_teacher,
    teacher_path,
)


def seed(source: Path, cache_dir: str, dataset: str | None = None, model: str | None = None,
         data_dir: str = "") -> tuple[Path, str]:
    """Copy the teacher at `source` into `cache_dir`; return its cache path and sha256."""
    if not source.is_file():
        raise TeacherError(f"teacher file {source} does not exist")
    record = source.with_suffix(".json")
    meta: dict[str, Any] = json.loads(record.read_text()) if record.is_file() else {}
    if meta and meta.get("sha256") != file_sha256(source):
        raise TeacherError(f"teacher file {source} does not match the sha256 in {record}: the file "
                           "was modified or is corrupt")
    dataset, model = dataset or meta.get("dataset"), model or meta.get("model")
    if not dataset or not model:
        raise TeacherError(f"no record {record} gives the teacher's dataset and model: pass "
                           "--dataset and --model")
    if meta.get("dataset", dataset) != dataset or meta.get("model", model) != model:
        raise TeacherError(f"{record} records dataset {meta['dataset']!r} / model {meta['model']!r}, "
                           f"not {dataset!r} / {model!r}")
    if "num_classes" not in meta:
        data = load_dataset(dataset, data_dir)
        meta = {"model": model, "dataset": dataset, "num_classes": data.num_classes,
                "in_channels": data.in_channels, "mean": list(data.mean), "std": list(data.std)}
    net = create_model(model, meta["num_classes"], meta["in_channels"], meta["mean"], meta["std"])
    try:
        net.load_state_dict(torch.load(source, map_location="cpu", weights_only=True))
    except Exception as e:  # noqa: BLE001 - any unreadable or unfitting file gets the same answer
        raise TeacherError(f"teacher file {source} is not a state dict of {model!r} for "
                           f"{dataset}: {e}") from e
    target = teacher_path(cache_dir, dataset, model)
    meta = {k: v for k, v in meta.items() if k not in ("sha256", "file")}
    meta["seeded_from"] = str(source.resolve())
    sha256 = copy_teacher(source, target, meta)
    load_teacher(target, meta["num_classes"], sha256)  # the cache now verifies it like a run does
    return target, sha256


def show(cache_dir: str) -> list[dict[str, Any]]:
    rows = []
    for record in sorted(cache_folder(cache_dir).glob("*.json")):
        meta = json.loads(record.read_text())
        pt = record.with_suffix(".pt")
        actual = file_sha256(pt) if pt.is_file() else None
        status = "ok" if actual == meta.get("sha256") else "MISSING FILE" if actual is None else "TAMPERED"
        rows.append({"file": str(pt), "sha256": meta.get("sha256"), "status": status,
                     "dataset": meta.get("dataset"), "model": meta.get("model")})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pmafl-teacher", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)
    p_seed = sub.add_parser("seed", help="copy a teacher file into a cache and print its sha256")
    p_seed.add_argument("file", type=Path)
    p_seed.add_argument("--cache-dir", default="", help="the node's teacher cache "
                        "(its `teacher-cache-dir`; default ~/.cache/pmafl/teachers)")
    p_seed.add_argument("--dataset", help="dataset the teacher was trained for (default: its record)")
    p_seed.add_argument("--model", help="teacher architecture (default: its record)")
    p_seed.add_argument("--data-dir", default="", help="dataset folder, when --dataset is needed")
    p_show = sub.add_parser("show", help="list a cache's teachers, checksums and integrity")
    p_show.add_argument("--cache-dir", default="")
    args = parser.parse_args(argv)
    try:
        if args.command == "seed":
            target, sha256 = seed(args.file, args.cache_dir, args.dataset, args.model, args.data_dir)
            print(f"Seeded {target}")
            print(f"sha256 {sha256}")
            print(f"Runs that must use exactly this teacher: --run-config \"teacher-sha256='{sha256}'\"")
        else:
            rows = show(args.cache_dir)
            for row in rows:
                print(f"{row['status']:<12} {row['sha256']}  {row['file']}")
            if not rows:
                print("no teachers in this cache")
    except TeacherError as e:
        print(f"pmafl-teacher: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
