"""How far does the student follow its teacher? Pre-trains one teacher per variant (public split
size, epochs, training attack, architecture), scores it, then runs a PM-AFL federation distilling
from it, and tabulates teacher against student.

    python bench/teacher_study.py --set "dataset='fashion-mnist'" --set dirichlet-alpha=0.3 \\
        --out docs/results/teacher-study-fashion
    python bench/teacher_study.py --variant "default=" --variant "epochs30=teacher-epochs=30" ...

A variant is `NAME=KEYS`, KEYS space-separated run-config overrides (empty: the defaults); the
`--set` keys apply to every variant. Each teacher is pre-trained as a run pre-trains its own
(`pmafl-teacher pretrain`, the shared teacher cache: every teacher setting is in its cache key)
and timed there (`pretrain_seconds` of its record). It is scored by `pmafl-evaluate` on the same
test images as the students (clean, PGD-20, AutoAttack on the first `--autoattack-n`); its
student is one `bench/compare.py` cell per seed with the variant's keys, in
`<out>/students/<variant>/`. `<out>/study.json` holds one row per variant. An interrupted study
resumes: a variant whose row exists is skipped, a teacher report in `<out>/teachers/` written for
the same teacher file (by sha256) and test images is read instead of scoring the teacher again,
and finished student cells are kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import compare  # noqa: E402

from pmafl.config import ConfigError, RunConfig, parse_overrides  # noqa: E402
from pmafl.eval_cli import run as evaluate_model_file  # noqa: E402
from pmafl.files import file_sha256  # noqa: E402
from pmafl.teacher.cli import pretrain  # noqa: E402

# The four settings, one at a time from the Fashion-MNIST default (public split 6,000 images,
# 15 epochs, FGSM-RS, cnn-large), then the two that add data and time together; PGD-10, the
# costliest teacher, last.
VARIANTS = {
    "default": "",
    "epochs30": "teacher-epochs=30",
    "public12k": "public-fraction=0.2",
    "cnn-small": "teacher-model='cnn-small'",
    "public12k-epochs30": "public-fraction=0.2 teacher-epochs=30",
    "pgd10": "teacher-attack='pgd'",
}
TEACHER_KEYS = ("clean_acc", "pgd20_acc", "autoattack_acc")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=KEYS",
                        help="a teacher variant (repeatable; default: " + ", ".join(
                            f"{name}={keys!r}" for name, keys in VARIANTS.items()) + ")")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="run-config override for every variant, teacher and student (repeatable)")
    parser.add_argument("--method", default="pmafl", help="the student's objective (default pmafl)")
    parser.add_argument("--seeds", default="0", help="the students' seeds (default 0)")
    parser.add_argument("--test-n", type=int, default=2000,
                        help="test images of every score, a fixed class-stratified subset (default "
                             "2000; 0: the whole test split)")
    parser.add_argument("--autoattack-n", type=int, default=200,
                        help="of those, the first N AutoAttack runs on (default 200)")
    parser.add_argument("--out", type=Path, default=Path("results/teacher-study"),
                        help="folder for study.json and the students (default results/teacher-study)")
    args = parser.parse_args(argv)
    variants = dict(VARIANTS) if not args.variant else {}
    for item in args.variant:
        name, sep, keys = item.partition("=")
        if not sep or not name or "/" in name:
            parser.error(f"--variant takes NAME=KEYS with a plain name, got {item!r}")
        variants[name] = keys
    args.variants = {}
    for name, keys in variants.items():
        items = args.set + keys.split()  # one KEY=VALUE each, as compare.py's --set takes them
        try:  # every variant's keys are checked before the first teacher trains
            RunConfig.from_mapping(parse_overrides(items, f"--variant {name}"), where=f"--variant {name}")
        except ConfigError as e:
            parser.error(str(e))
        args.variants[name] = items
    return args


def scored_before(report: Path, sha256: str, args: argparse.Namespace) -> dict | None:
    """The teacher's report at `report` when an earlier call wrote it for this very teacher file
    (the file it names still has `sha256`) on the same test images; else None."""
    if not report.is_file():
        return None
    found = json.loads(report.read_text())
    model_file = Path(found.get("model_file", ""))
    same_file = model_file.is_file() and file_sha256(model_file) == sha256
    # A report does not say which --limit made it: with the whole test split (0), score again.
    same_images = 0 < args.test_n == found.get("num_examples") and \
        found.get("autoattack_n") == args.autoattack_n
    return found if same_file and same_images else None


def study_row(name: str, items: list[str], args: argparse.Namespace) -> dict:
    """Pre-train (or find) the variant's teacher, score it, run its students; the study's row."""
    cfg = RunConfig.from_mapping(parse_overrides(items, f"--variant {name}"))
    path, sha256, record = pretrain(cfg, "")
    print(f"{name}: teacher {path.name}, pre-trained in {record.get('pretrain_seconds', '?')} s", flush=True)
    report = args.out / "teachers" / f"{name}.json"
    teacher = scored_before(report, sha256, args)
    if teacher is None:  # AutoAttack on a cnn-large teacher takes most of an hour on 2 cores
        teacher = evaluate_model_file([str(path), "--attacks", "pgd20,autoattack", "--limit",
                                       str(args.test_n), "--autoattack-n", str(args.autoattack_n),
                                       "--sweep", "", "--out", str(report)])
    students = args.out / "students" / name
    grid = ["--methods", args.method, "--seeds", args.seeds, "--alphas", repr(cfg.dirichlet_alpha),
            "--out", str(students), "--test-n", str(args.test_n), "--autoattack-n", str(args.autoattack_n)]
    if compare.main(grid + [arg for item in items for arg in ("--set", item)]) != 0:
        raise RuntimeError(f"variant {name}: a student cell failed; see {students / 'runs'}")
    finals = [json.loads(p.read_text()) for p in sorted((students / "runs").glob("*/final.json"))]
    return {"variant": name, "keys": items, "teacher_file": path.name, "teacher_sha256": sha256,
            "teacher_settings": record["settings"], "pretrain_seconds": record.get("pretrain_seconds"),
            "pretrain_device": record.get("pretrain_device"),
            "teacher": {k: teacher[k] for k in TEACHER_KEYS},
            "num_examples": teacher["num_examples"], "autoattack_n": teacher["autoattack_n"],
            "students": [{"seed": f["cell"]["seed"], **{k: f[k] for k in (*TEACHER_KEYS, "cw_acc")},
                          "fed_worst_pgd_acc": f["fed_worst_pgd_acc"],
                          "federation_seconds": f.get("federation_seconds")} for f in finals]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    study = args.out / "study.json"
    rows = {r["variant"]: r for r in (json.loads(study.read_text()) if study.is_file() else [])}
    for name, items in args.variants.items():
        if name in rows:
            print(f"{name}: done before, skipped", flush=True)
            continue
        rows[name] = study_row(name, items, args)
        study.write_text(json.dumps(list(rows.values()), indent=2) + "\n")
    print(f"{'variant':<12} {'teacher clean':>13} {'AA':>6} {'pre-train s':>11}   "
          f"{'student clean':>13} {'AA':>6}")
    for row in rows.values():
        t, s = row["teacher"], row["students"]
        clean = sum(x["clean_acc"] for x in s) / len(s)
        aa = sum(x["autoattack_acc"] for x in s) / len(s)
        print(f"{row['variant']:<12} {t['clean_acc']:>13.3f} {t['autoattack_acc']:>6.3f} "
              f"{row['pretrain_seconds'] or 0:>11.0f}   {clean:>13.3f} {aa:>6.3f}")
    print(f"Written to {study}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
