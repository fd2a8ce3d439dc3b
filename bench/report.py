"""Results tables in README.md and docs/*.md, written from the committed result files.

    python bench/report.py           # rewrite every generated table in place
    python bench/report.py --check   # exit 1, naming each table that differs from its data

A generated table sits between `<!-- table: NAME -->` and `<!-- /table -->`, NAME a key of
`TABLES`; everything outside the markers is left alone. Each table ends with the result folders it
was read from, their data sizes and seeds, and the command that wrote them (`GRIDS`).
tests/test_report.py runs `--check`, so a table that drifts from the files in docs/results fails
the tests, and it fails on a results table written by hand outside the markers.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

from compare import COLUMNS as compare_columns  # noqa: E402
from compare import mean_std  # noqa: E402
from hostile import read_rows  # noqa: E402
from hostile import table as hostile_table  # noqa: E402

FASHION = "--alphas 0.3 --set \"dataset='fashion-mnist'\" --autoattack-n 200"
ROBUSTKD_DIGITS = "--autoattack-n 200 --set backdoor-client-rate=0.1"
ROBUSTKD_FASHION = f"{FASHION} --set backdoor-client-rate=0.1 --set backdoor-rate=0.1"
FEDFTG = ("--methods ce,ce+fedftg,pgd-at,pgd-at+fedftg,pgd-at+fedftg-robust,pmafl,pmafl+fedftg,"
          "pmafl+fedftg-robust --alphas 0.1")
# The 6,000-image protocol of docs/fashion-mnist.md, as the 2-core CPU runs it (AutoAttack on 500).
FASHION_6000 = ("--alphas 0.3 --set \"dataset='fashion-mnist'\" --set max-train-examples=6000 "
                "--test-n 0 --autoattack-n 500")
ABLATIONS = {"grad-clip0": "--set grad-clip=0", "lambda0.1": "--set lambda-alg=0.1", "tau2": "--set tau=2.0",
             "lambda0.1-grad-clip0": "--set lambda-alg=0.1 --set grad-clip=0",
             "tau2-grad-clip0": "--set tau=2.0 --set grad-clip=0"}
# Every committed result folder and the command that wrote it (run from the repository root).
GRIDS: dict[str, str] = {
    "digits": "python bench/compare.py --methods ce,pgd-at,trades,pmafl --autoattack-n 200",
    "fashion-mnist": f"python bench/compare.py --methods ce,pgd-at,fat,trades,mart,calfat,pmafl {FASHION}",
    "nodefence-digits": "python bench/compare.py --methods pmafl --autoattack-n 200 "
                        "--set clip-factor=0 --set weight-cap=0",
    "defaults-fashion": f"python bench/compare.py --methods pmafl {FASHION}",
    "fedftg-digits": f"python bench/compare.py {FEDFTG} --autoattack-n 200",
    "fedftg-fashion": f"python bench/compare.py {FEDFTG} --set \"dataset='fashion-mnist'\" "
                      "--autoattack-n 200",
    "kdiga-digits/weight0": "python bench/compare.py --methods kdiga,pmafl --autoattack-n 200",
    "kdiga-digits/weight3": "python bench/compare.py --methods kdiga --set kdiga-weight=3 --autoattack-n 200",
    "kdiga-digits/weight1": "python bench/compare.py --methods pmafl --set kdiga-weight=1 --autoattack-n 200",
    "kdiga-fashion/weight0": f"python bench/compare.py --methods kdiga {FASHION}",
    "kdiga-fashion/weight3": f"python bench/compare.py --methods kdiga {FASHION} --set kdiga-weight=3",
    "kdiga-fashion/weight1": f"python bench/compare.py --methods pmafl {FASHION} --set kdiga-weight=1",
    "robustkd-digits/backdoor": f"python bench/compare.py --methods pgd-at,pmafl {ROBUSTKD_DIGITS} "
                                "--set backdoor-rate=0.1",
    "robustkd-digits/backdoor-robustkd": f"python bench/compare.py --methods pmafl {ROBUSTKD_DIGITS} "
                                         "--set backdoor-rate=0.1 --set robustkd-weight=1",
    "robustkd-digits/clean": f"python bench/compare.py --methods pmafl {ROBUSTKD_DIGITS}",
    "robustkd-digits/clean-robustkd": f"python bench/compare.py --methods pmafl {ROBUSTKD_DIGITS} "
                                      "--set robustkd-weight=1",
    "robustkd-fashion/backdoor": f"python bench/compare.py --methods pmafl,pgd-at {ROBUSTKD_FASHION}",
    "robustkd-fashion/backdoor-robustkd": f"python bench/compare.py --methods pmafl {ROBUSTKD_FASHION} "
                                          "--set robustkd-weight=1",
    **{f"compression-digits/{c}": "python bench/compare.py --methods pmafl --alphas 0.1 "
       f"--set \"update-compression='{c}'\" --autoattack-n 200" for c in ("none", "fp16", "int8", "topk")},
    "fgsm-rs-digits": "python bench/compare.py --methods pmafl,pgd-at --set \"train-attack='fgsm-rs'\" "
                      "--autoattack-n 200",
    **{f"ablation-digits/{name}": f"python bench/compare.py --methods pmafl --seeds 0 {sets} "
       "--autoattack-n 200" for name, sets in ABLATIONS.items()},
    "fedftg-cost-digits": "python bench/compare.py --methods ce+fedftg,pmafl+fedftg,pmafl+fedftg-robust "
                          "--seeds 0 --autoattack-n 200",
    "fair-digits": "python bench/compare.py --methods pmafl --set fair-q=5.0 --autoattack-n 200",
    "fair-fashion": f"python bench/compare.py --methods pmafl {FASHION} --set fair-q=5.0",
    "fashion-6000/grid": f"python bench/compare.py --methods pgd-at,fat,trades,calfat,pmafl {FASHION_6000}",
    "fashion-6000/kdiga1": f"python bench/compare.py --methods pmafl {FASHION_6000} --set kdiga-weight=1",
    "fashion-6000/kdiga1-ce1": f"python bench/compare.py --methods pmafl {FASHION_6000} --set kdiga-weight=1 "
                               "--set ce-weight=1",
    # The rule's digits clause: each candidate in the default digits federation, run with the code of
    # the `digits` grid it is compared with (kdiga-digits/ is older: its pmafl scores 1.6 clean points
    # below today's).
    "rule-digits/kdiga1": "python bench/compare.py --methods pmafl --set kdiga-weight=1 --autoattack-n 200",
    "rule-digits/kdiga1-ce1": "python bench/compare.py --methods pmafl --set kdiga-weight=1 "
                              "--set ce-weight=1 --autoattack-n 200",
    "step-time/cpu-28x28.json": "python bench/step_time.py --image-size 28 --repeats 2",
    "deployment/3-nodes.json": "python bench/deployment.py",
    "scale/10-vs-100.json": "python bench/scale.py",
    "evaluation/digits-pmafl-seed0.json": "pmafl-evaluate docs/results/digits/runs/pmafl_alpha0.5_seed0/"
                                          "results/<run>/model.pt --autoattack-n 359",
    "robustkd-digits/backdoor-unstamped": "python bench/compare.py --methods pmafl --set backdoor-rate=0.1 "
                                          "--autoattack-n 200",
    "robustkd-digits/vet.json": "python bench/vet_teachers.py",
    "hostile-digits": "python bench/hostile.py",
    "hostile-digits-cap4": "python bench/hostile.py --set weight-cap=4.0",
    "hostile-digits-median": "python bench/hostile.py --attacks none,scale,sign-flip-claim "
                             "--set \"aggregation='median'\"",
    "hostile-digits-trimmed-mean": "python bench/hostile.py --attacks none,scale,sign-flip-claim --hostile 1 "
                                   "--set \"aggregation='trimmed-mean'\"",
    "hostile-digits-nodefence": "python bench/hostile.py --attacks scale,sign-flip-claim --hostile 1 "
                                "--set clip-factor=0 --set weight-cap=0",
    "hostile-fashion": "python bench/hostile.py --rounds 10 --set \"dataset='fashion-mnist'\"",
    "robustkd-fashion/vet.json": "python bench/vet_teachers.py --set \"dataset='fashion-mnist'\" "
                                 "--kinds KIND --seeds 0,1,2",
    "curves/fashion-2000.json": "python bench/curves.py " + " ".join(
        f"--run {m}=docs/results/fashion-mnist:{m}" for m in ("pgd-at", "fat", "trades", "calfat", "pmafl"))
        + " --run \"pmafl + KDIGA=docs/results/kdiga-fashion/weight1:pmafl\"",
    "curves/fashion-6000.json": "python bench/curves.py " + " ".join(
        f"--run {m}=docs/results/fashion-6000/grid:{m}" for m in ("fat", "trades", "pmafl"))
        + " --run \"pmafl + KDIGA=docs/results/fashion-6000/kdiga1:pmafl\""
        + " --run \"pmafl + KDIGA + CE=docs/results/fashion-6000/kdiga1-ce1:pmafl\"",
    "curves/probes-fashion-6000.json": "python bench/curves.py --run \"pmafl + KDIGA (the 30-round "
        "cell)=docs/results/fashion-6000/kdiga1:pmafl\" " + " ".join(
            f"--run \"{label}=docs/results/fashion-6000/probes/{name}/results.json\""
            for name, label in (("teacher-epochs30", "teacher-epochs 30"), ("ce-weight1", "ce-weight 1"),
                                ("ce-weight3", "ce-weight 3"))),
    "worst-node/digits-pmafl-seed0.json": "./run.sh && python bench/worst_node.py results/<run>",
    "worst-node/digits-pgd-at-seed0.json": "./run.sh --run-config \"objective='pgd-at'\" && "
                                           "python bench/worst_node.py results/<run>",
    "worst-node/fashion-pmafl-seed0.json": "python bench/worst_node.py docs/results/teacher-study-fashion/"
                                           "students/default/runs/pmafl_alpha0.3_seed0/results/<run>",
    "teacher-study-fashion/study.json": "python bench/teacher_study.py --set \"dataset='fashion-mnist'\" "
                                        "--set dirichlet-alpha=0.3",
    # The run's teacher, wherever its cache key puts it (`pmafl-teacher pretrain` prints its path).
    "teachers/digits.json": "pmafl-evaluate \"$(pmafl-teacher pretrain | sed -n 's/^Teacher //p')\" "
                            "--autoattack-n 200",
    "teachers/fashion-mnist.json": "pmafl-evaluate \"$(pmafl-teacher pretrain --run-config "
                                   "\"dataset='fashion-mnist'\" | sed -n 's/^Teacher //p')\" "
                                   "--limit 2000 --autoattack-n 200",
}

# A column: its final.json key and header; the first five are compare.py's report columns.
ALL = ("clean", "pgd20", "cw", "aa", "worst")
COLUMNS: dict[str, tuple[str, str]] = {
    **dict(zip(ALL, compare_columns, strict=True)),
    "aa_pgd20": ("autoattack_subset_pgd20_acc", "PGD-20 on AutoAttack's images"),
    "asr": ("asr", "backdoor ASR"),
    "nodes": ("fed_pgd_acc", "node-mean PGD-20"),
}


class Sources:
    """The result files one table reads, for its closing lines: where, how much data, which command."""

    def __init__(self) -> None:
        self.used: dict[str, list[dict[str, Any]]] = {}

    def runs(self, folder: str, method: str, seed: int | None = None,
             optional: bool = False) -> list[dict[str, Any]]:
        """The final.json of every seed (or of `seed`) of `method` in the grid `folder`, by seed;
        none is an error unless `optional` (a grid still running)."""
        paths = sorted((RESULTS / folder / "runs").glob(f"{method}_alpha*_seed*/final.json"))
        runs = sorted((json.loads(p.read_text()) for p in paths), key=lambda r: r["cell"]["seed"])
        runs = [r for r in runs if seed is None or r["cell"]["seed"] == seed]
        if not runs and optional:
            return []
        if not runs:
            raise SystemExit(f"docs/results/{folder}: no finished cell of method '{method}'"
                             + (f" with seed {seed}" if seed is not None else ""))
        self.used.setdefault(folder, []).extend(runs)
        return runs

    def file(self, name: str) -> Any:
        if not (RESULTS / name).is_file():
            raise SystemExit(f"docs/results/{name}: no such file; `{GRIDS[name]}` writes it")
        data = json.loads((RESULTS / name).read_text())
        self.used.setdefault(name, [])
        return data

    def caption(self) -> str:
        lines = ["", "Generated by `python bench/report.py` from:"]
        for folder, runs in self.used.items():
            # bench/vet_teachers.py's and teacher_study.py's --out name the folder of their file,
            # the others their output.
            out = folder.removesuffix("/vet.json").removesuffix("/study.json")
            command = f"{GRIDS[folder]} --out docs/results/{out}"
            size = ""
            if runs:
                seeds = sorted({r["cell"]["seed"] for r in runs})
                aa = max(r.get("autoattack_n", 0) for r in runs)
                seeds_text = ("seeds " if len(seeds) > 1 else "seed ") + ", ".join(map(str, seeds))
                size = (f" ({runs[0]['dataset']}, {runs[0]['num_examples']:,} test images, AutoAttack on "
                        f"the first {aa}; {seeds_text})")
            lines.append(f"- `docs/results/{folder}`{size}: `{command}`")
        return "\n".join(lines) + "\n"


def _cell(runs: list[dict[str, Any]], column: str) -> tuple[str, float | None]:
    key = COLUMNS[column][0]
    values = [r[key] for r in runs if r.get(key) is not None]
    return (mean_std(values), statistics.mean(values)) if values else ("-", None)


def _bold_best(cells: list[list[tuple[str, float | None]]], columns: tuple[str, ...]) -> list[list[str]]:
    """Each row's cells, the highest mean of each accuracy column in bold (ASR: none)."""
    out = [[text for text, _ in row] for row in cells]
    for j, column in enumerate(columns):
        means = [row[j][1] for row in cells if row[j][1] is not None]
        if column == "asr" or len(means) < 2:
            continue
        best = max(round(m, 3) for m in means)
        for i, row in enumerate(cells):
            if row[j][1] is not None and round(row[j][1], 3) == best:
                out[i][j] = f"**{out[i][j]}**"
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def _cost(runs: list[dict[str, Any]]) -> list[str]:
    """Minutes per cell (federation and attack suite, mean over seeds) and the machine."""
    minutes = [(r["federation_seconds"] + r["suite_seconds"]) / 60 for r in runs
               if "federation_seconds" in r and "suite_seconds" in r]
    machines = sorted({r.get("machine", "-") for r in runs})
    return [f"{statistics.mean(minutes):.0f}" if minutes else "-", ", ".join(machines)]


def grid(rows: list[tuple[str, str, str]], columns: tuple[str, ...] = ALL, first: str = "method",
         bold: bool = True, teacher: str = "", cost: bool = False) -> Callable[[], str]:
    """One row per (label, folder, method): mean ± std over seeds of each column; with `teacher`,
    a teacher row first and the student's share of the teacher's AutoAttack accuracy; with
    `cost`, the minutes each cell took and on what machine."""
    def render() -> str:
        src = Sources()
        runs = [src.runs(folder, method) for _, folder, method in rows]
        cells = [[_cell(r, c) for c in columns] for r in runs]
        shown = _bold_best(cells, columns) if bold else [[t for t, _ in row] for row in cells]
        header = [first, "seeds", *(COLUMNS[c][1] for c in columns)]
        body = [[label, str(len(r)), *row] for (label, _, _), r, row in zip(rows, runs, shown, strict=True)]
        if cost:
            header += ["minutes per cell", "machine"]
            body = [row + _cost(r) for row, r in zip(body, runs, strict=True)]
        if teacher:
            t = src.file(f"teachers/{teacher}.json")
            share = [f"{statistics.mean(x['autoattack_acc'] for x in r) / t['autoattack_acc']:.2f}"
                     for r in runs]
            header.append("student / teacher AutoAttack")
            body = [["the teacher (`cnn-large`)", "-",
                     *(f"{t[COLUMNS[c][0]]:.3f}" if COLUMNS[c][0] in t else "-" for c in columns), "1"]] + \
                   [row + [s] for row, s in zip(body, share, strict=True)]
        return _table(header, body) + src.caption()
    return render


def _points(x: float) -> str:
    """A signed change to one decimal, with no "-0.0" for a change that rounds to nothing."""
    return f"{round(x, 1) + 0.0:+.1f}"


def paired(rows: list[tuple[str, tuple[str, str], tuple[str, str]]],
           columns: tuple[str, ...] = ("clean", "pgd20", "aa", "worst")) -> Callable[[], str]:
    """Per seed, in points, a variant minus its base on the same seed: the mean, then each seed."""
    def render() -> str:
        src = Sources()
        body = []
        for label, variant, base in rows:
            v, b = src.runs(*variant), src.runs(*base)
            if [r["cell"]["seed"] for r in v] != [r["cell"]["seed"] for r in b]:
                raise SystemExit(f"{variant} and {base}: not the same seeds")
            cells = []
            for c in columns:
                key = COLUMNS[c][0]
                diffs = [(x[key] - y[key]) * 100 for x, y in zip(v, b, strict=True)]
                cells.append(f"{_points(statistics.mean(diffs))} (" + ", ".join(map(_points, diffs)) + ")")
            body.append([label, ", ".join(str(r["cell"]["seed"]) for r in v), *cells])
        return _table(["change", "seeds", *(COLUMNS[c][1] for c in columns)], body) + src.caption()
    return render


def per_seed(folder: str, methods: list[str]) -> Callable[[], str]:
    """clean / PGD-20 / AutoAttack of each seed of each method."""
    def render() -> str:
        src = Sources()
        runs = {m: src.runs(folder, m) for m in methods}
        seeds = sorted({r["cell"]["seed"] for rs in runs.values() for r in rs})
        body = []
        for m, rs in runs.items():
            by_seed = {r["cell"]["seed"]: r for r in rs}
            body.append([f"`{m}`", *(f"{by_seed[s]['clean_acc']:.3f} / {by_seed[s]['pgd20_acc']:.3f} / "
                                     f"{by_seed[s]['autoattack_acc']:.3f}" if s in by_seed else "-"
                                     for s in seeds)])
        return _table(["method", *(f"seed {s}" for s in seeds)], body) + src.caption()
    return render


def warnings_grid(folder: str, methods: list[str]) -> Callable[[], str]:
    """A grid's every column, PGD-20 on AutoAttack's images and the warnings of the attack suite."""
    columns = ("clean", "pgd20", "cw", "aa", "aa_pgd20", "worst")
    def render() -> str:
        src = Sources()
        body = []
        for m in methods:
            runs = src.runs(folder, m)
            masking = sum(len(r["gradient_masking_warnings"]) for r in runs)
            overfitting = sum(len(r.get("overfitting_warnings", [])) for r in runs)
            body.append([f"`{m}`", str(len(runs)), *(_cell(runs, c)[0] for c in columns),
                         f"{masking} / {overfitting}"])
        header = ["method", "seeds", *(COLUMNS[c][1] for c in columns), "masking / overfitting warnings"]
        return _table(header, body) + src.caption()
    return render


def compression() -> str:
    """Update compression: accuracy and megabytes uploaded (clients to server), against float32."""
    src = Sources()
    columns = ("clean", "pgd20", "aa", "worst")
    body, base = [], None
    for encoding, label in (("none", "`none` (float32)"), ("fp16", "`fp16`"), ("int8", "`int8`"),
                            ("topk", "`topk` (10%)")):
        runs = src.runs(f"compression-digits/{encoding}", "pmafl")
        up = statistics.mean([r["bytes_received"] for r in runs]) / 1e6
        down = statistics.mean([r["bytes_sent"] for r in runs]) / 1e6
        base = base or up
        body.append([label, str(len(runs)), *(_cell(runs, c)[0] for c in columns),
                     f"{up:.2f}", f"{up / base:.2f}", f"{down:.2f}"])
    header = ["encoding", "seeds", *(COLUMNS[c][1] for c in columns), "MB up", "of `none`", "MB down"]
    return _table(header, body) + src.caption()


def vetting(dataset: str) -> Callable[[], str]:
    """`pmafl-teacher vet`'s verdict on backdoored and clean teachers (bench/vet_teachers.py)."""
    def render() -> str:
        src = Sources()
        rows = sorted(src.file(f"robustkd-{dataset}/vet.json"),
                      key=lambda r: (r["teacher"] != "backdoored", r["seed"]))
        body = []
        for r in rows:
            norms = r["norms"]
            smallest = min(range(len(norms)), key=norms.__getitem__)
            median = statistics.median(norms)
            detox = (f"{len(r['channels'])}, {r['detox_clean_acc']:.3f} / {r['detox_asr']:.3f}"
                     if "detox_asr" in r else "-")
            body.append([f"{r['teacher']}, seed {r['seed']}", f"{r['clean_acc']:.3f}", f"{r['asr']:.3f}",
                         f"{norms[smallest]:.1f} ({smallest})", f"{median:.1f}",
                         f"{norms[smallest] / median:.3f}", f"{r['anomaly_index']:.2f}",
                         "yes" if r["anomaly_index"] > 2 else "no", "yes" if r["flagged"] else "no", detox])
        header = ["teacher", "clean acc", "trigger's ASR", "smallest mask (class)", "median class",
                  "ratio", "anomaly index", "index > 2", "flagged", "detoxified: channels, clean acc / ASR"]
        return _table(header, body) + src.caption()
    return render


def teacher_study(name: str) -> Callable[[], str]:
    """bench/teacher_study.py's rows: each teacher variant against the PM-AFL student it taught."""
    def render() -> str:
        src = Sources()
        rows = src.file(f"{name}/study.json")
        body = []
        for r in rows:
            t, students = r["teacher"], r["students"]
            mean = {k: statistics.mean(s[k] for s in students)
                    for k in ("clean_acc", "pgd20_acc", "autoattack_acc", "fed_worst_pgd_acc")}
            keys = " ".join(k for k in r["keys"] if k not in rows[0]["keys"]) or "(the default)"
            seeds = ", ".join(str(s["seed"]) for s in students)
            body.append([f"`{r['variant']}`: {keys}", f"{r['pretrain_seconds']:.0f}",
                         f"{t['clean_acc']:.3f}", f"{t['pgd20_acc']:.3f}", f"{t['autoattack_acc']:.3f}",
                         f"{mean['clean_acc']:.3f}", f"{mean['pgd20_acc']:.3f}",
                         f"{mean['autoattack_acc']:.3f}", f"{mean['fed_worst_pgd_acc']:.3f}",
                         f"{mean['autoattack_acc'] - t['autoattack_acc']:+.3f}", seeds])
        header = ["teacher", "pre-training s (CPU)", "teacher clean", "teacher PGD-20", "teacher AA",
                  "student clean", "student PGD-20", "student AA", "student worst node PGD-20",
                  "student AA - teacher AA", "student seeds"]
        first = rows[0]
        size = (f"\nEvery score on the same {first['num_examples']:,} test images (AutoAttack on the "
                f"first {first['autoattack_n']}); the keys every row shares: `{' '.join(first['keys'])}`.")
        return _table(header, body) + size + "\n" + src.caption()
    return render


def worst_node(name: str) -> Callable[[], str]:
    """bench/worst_node.py's file: each node's score beside its data size and class mix."""
    def render() -> str:
        src = Sources()
        data = src.file(f"worst-node/{name}.json")
        body = [[str(n["node"]), str(n["train_examples"]), f"{n['effective_classes']:.1f}",
                 f"{n['clean_acc']:.3f}", f"{n['pgd20_acc']:.3f}", f"{n['predicted_pgd20_acc']:.3f}"]
                for n in sorted(data["nodes"], key=lambda n: n["pgd20_acc"])]
        header = ["node", "training images", "effective classes", "clean", "PGD-20",
                  "PGD-20 its class mix predicts"]
        classes = ", ".join(f"{c['class']}: {c['pgd20_acc']:.2f}" for c in data["per_class"])
        notes = (f"\n`{data['objective']}`, seed {data['seed']}, on {data['dataset']}: PGD-20 per class on "
                 f"{data['test_n']:,} test images {classes}. A node's PGD-20 correlates with its "
                 f"class mix's prediction at {data['corr_pgd20_predicted']:.2f}, with its training "
                 f"images at {data['corr_pgd20_train_examples']:.2f}, with its effective number of "
                 f"classes at {data['corr_pgd20_effective_classes']:.2f}.")
        if "teacher_pgd20_acc" in data:
            teacher = ", ".join(f"{c['class']}: {c['teacher_pgd20_acc']:.2f}" for c in data["per_class"])
            notes += (f" The run's teacher on the same images: PGD-20 {data['teacher_pgd20_acc']:.3f}, per "
                      f"class {teacher}; the student's per-class PGD-20 correlates with the teacher's "
                      f"at {data['corr_class_pgd20_teacher']:.2f}.")
        notes += "\n"
        return _table(header, body) + notes + src.caption()
    return render


def curves(name: str, at: tuple[int, ...] = (10, 20, 30)) -> Callable[[], str]:
    """bench/curves.py's file: the per-round central evaluation at a few rounds, mean over seeds,
    and what the last ten rounds added."""
    def render() -> str:
        src = Sources()
        data = src.file(f"curves/{name}.json")
        body = []
        for label, c in data.items():
            index = {r: i for i, r in enumerate(c["rounds"])}
            last = at[-1]
            cells = [f"{c['clean_acc'][index[r]]:.3f} / {c['pgd_acc'][index[r]]:.3f}" for r in at]
            gain = c["pgd_acc"][index[last]] - c["pgd_acc"][index[last - 10]]
            body.append([label, *cells, f"{gain:+.3f}", str(c["seeds"])])
        header = ["run", *(f"round {r}: clean / PGD-20" for r in at),
                  f"PGD-20 gain, rounds {at[-1] - 10}-{at[-1]}", "seeds"]
        note = (f"\nThe per-round central evaluation (the run's `eval-examples` test images), mean over "
                f"seeds; the curves: [{name}.png](results/curves/{name}.png).\n")
        return _table(header, body) + note + src.caption()
    return render


def overview() -> str:
    """The README's one table: every method on both datasets, clean, PGD-20 and AutoAttack."""
    src = Sources()
    rows = [("Fashion-MNIST", f"`{m}`", "fashion-mnist", m)
            for m in ("ce", "pgd-at", "fat", "trades", "mart", "calfat", "pmafl")]
    rows.append(("Fashion-MNIST", "`pmafl` + KDIGA (`kdiga-weight=1`)", "kdiga-fashion/weight1", "pmafl"))
    rows += [("digits", f"`{m}`", "digits", m) for m in ("ce", "pgd-at", "trades", "pmafl")]
    columns = ("clean", "pgd20", "aa")
    body = []
    for data in ("Fashion-MNIST", "digits"):
        group = [r for r in rows if r[0] == data]
        cells = [[_cell(src.runs(folder, m), c) for c in columns] for _, _, folder, m in group]
        body += [[data, label, *row] for (_, label, _, _), row in zip(group, _bold_best(cells, columns),
                                                                       strict=True)]
    return _table(["data", "method", "clean", "PGD-20", "AutoAttack"], body) + src.caption()


def single_seed(rows: list[tuple[str, str]], seed: int = 0) -> Callable[[], str]:
    """One seed of PM-AFL per (label, folder): clean, PGD-20 and AutoAttack of the final model."""
    def render() -> str:
        src = Sources()
        body = []
        for label, folder in rows:
            r = src.runs(folder, "pmafl", seed)[0]
            body.append([label, *(f"{r[COLUMNS[c][0]]:.3f}" for c in ("clean", "pgd20", "aa"))])
        return _table(["`--set`", "clean", "PGD-20", "AutoAttack"], body) + src.caption()
    return render


def step_time(name: str) -> Callable[[], str]:
    """bench/step_time.py's milliseconds per local step and their ratio to a PGD-10 PGD-AT step."""
    def render() -> str:
        src = Sources()
        record = src.file(f"step-time/{name}.json")
        body = [[f"`{r['step']}`", f"{r['ms']:.1f}", f"{r['ratio']:.2f}x"] for r in record["steps"]]
        return (f"{record['setup']}, {record['repeats']} repeats:\n\n"
                + _table(["step", "ms", "of a PGD-10 PGD-AT step"], body) + src.caption())
    return render


def deployment_speed() -> str:
    """bench/deployment.py's medians over rounds 2 and later: warm and cold deployment, simulation."""
    src = Sources()
    record = src.file("deployment/3-nodes.json")
    m, torch_s = record["medians"], record["import_torch_seconds"]
    kinds = [k for k in ("deployment", "cold-deployment", "simulation") if k in m]
    names = {"deployment": "deployment, warm worker", "cold-deployment": "deployment, cold",
             "simulation": "simulation"}
    sim = m["simulation"]["round"]
    body = [["seconds per round", *(f"{m[k]['round']:.2f}" for k in kinds)],
            ["round time / simulation's", *(f"{m[k]['round'] / sim:.2f}" for k in kinds)],
            ["overhead per round beyond the slowest node's compute",
             *(f"{m[k]['overhead']:.2f}" for k in kinds)],
            ["ClientApp start-up to its first training step, beyond `import torch`",
             *(f"{m[k]['startup'] - torch_s:.2f}" if k != "simulation" else "-" for k in kinds)]]
    return (f"{record['nodes']} nodes, {record['rounds']} rounds, {record['cpus']} CPU cores; a fresh "
            f"`import torch` took {torch_s:.2f} s:\n\n"
            + _table(["median, rounds 2 and later", *(names[k] for k in kinds)], body) + src.caption())


def fedftg_cost() -> str:
    """FedFTG's server time per round (medians over rounds), against the slowest client's own
    training (what a round costs when clients train in parallel) and the whole simulated round."""
    src = Sources()
    body = []
    for label, method in (("`ce` (FedAvg) + `fedftg`", "ce+fedftg"), ("`pmafl` + `fedftg`", "pmafl+fedftg"),
                          ("`pmafl` + `fedftg-robust`", "pmafl+fedftg-robust")):
        for r in src.runs("fedftg-cost-digits", method):
            rounds = [x for x in r["rounds"] if x.get("fedftg_seconds")]
            med = statistics.median
            body.append([label, str(r["cell"]["seed"]), f"{med(x['fedftg_seconds'] for x in rounds):.2f} s",
                         f"{med(x['fedftg_seconds'] / x['train_compute_seconds'] for x in rounds):.2f}x",
                         f"{med(x['fedftg_seconds'] / x['round_seconds'] for x in rounds):.2f}"])
    return _table(["around", "seed", "FedFTG per round", "/ slowest client's training", "/ round"],
                  body) + src.caption()


def scale() -> str:
    """bench/scale.py: the median round time and peak Ray-worker memory, few nodes against many."""
    src = Sources()
    record = src.file("scale/10-vs-100.json")
    body = []
    for key, nodes in (("small", record["small"]), ("large", record["large"])):
        r = record["runs"][key]
        body.append([str(nodes), str(record["small"]), f"{r['round']:.2f}", f"{r['first_round']:.1f}",
                     f"{r['memory'] / 2**20:,.0f} MiB ({r['workers']} workers at most)"])
    small, large = record["runs"]["small"], record["runs"]["large"]
    return (f"{record['per_node']} training examples per node (IID), {record['rounds']} rounds, "
            f"{record['cpus']} CPU cores; the large run's round time is "
            f"{large['round'] / small['round']:.2f}x the small one's:\n\n"
            + _table(["nodes", "per round", "median round time (s), rounds 2 and later", "round 1 (s)",
                      "peak memory of one Ray worker"], body) + src.caption())


def evaluation() -> str:
    """One `pmafl-evaluate` report: every attack's accuracy, then the PGD-20 eps sweep."""
    src = Sources()
    r = src.file("evaluation/digits-pmafl-seed0.json")
    names = [("clean_acc", "clean"), ("fgsm_acc", "FGSM"), ("pgd20_acc", "PGD-20"), ("cw_acc", "CW_inf"),
             ("autoattack_acc", f"AutoAttack ({r.get('autoattack_n', '-')} images)")]
    shown = [(key, label) for key, label in names if key in r]
    sweep = ", ".join(f"{p['eps']:g}: {p['pgd20_acc']:.3f}" for p in r["eps_sweep"])
    return (_table([label for _, label in shown], [[f"{r[key]:.3f}" for key, _ in shown]])
            + f"\nPGD-20 eps sweep ({r.get('sweep_n', '-')} images): {sweep}.\n" + src.caption())


def hostile(*columns: tuple[str, str]) -> Callable[[], str]:
    """A `bench/hostile.py --table` of these result folders (label, folder under docs/results)."""
    def render() -> str:
        found = [(label, folder, read_rows(RESULTS / folder)) for label, folder in columns]
        lines = ["", "Generated by `python bench/report.py` from:"]
        for _, folder, rows in found:
            seeds = ", ".join(str(s) for s in sorted({r["seed"] for r in rows}))
            lines.append(f"- `docs/results/{folder}` ({rows[0]['dataset']}, {rows[0]['rounds']} rounds, "
                         f"{rows[0]['eval_examples']:,} test images; seed {seeds}): "
                         f"`{GRIDS[folder]} --out docs/results/{folder}`")
        table = hostile_table([(label, rows) for label, _, rows in found])
        return table + "\n".join(lines) + "\n"
    return render


def honest_cost() -> str:
    """The default defences (clip 2, weight cap 1) against none, with no attacker."""
    src = Sources()
    rows = [("digits", "default (clip 2, cap 1)", "digits"),
            ("digits", "`clip-factor=0 weight-cap=0`", "nodefence-digits"),
            ("Fashion-MNIST", "default (clip 2, cap 1)", "defaults-fashion"),
            ("Fashion-MNIST", "`clip-factor=0 weight-cap=0` (before issue 37)", "fashion-mnist")]
    body = []
    for data, label, folder in rows:
        runs = src.runs(folder, "pmafl")
        body.append([data, label, str(len(runs)), *(_cell(runs, c)[0] for c in ("clean", "pgd20", "aa"))])
    return _table(["data", "config", "seeds", "clean", "PGD-20", "AutoAttack"], body) + src.caption()


FEDFTG_ROWS = [("`ce` (FedAvg)", "ce"), ("`ce` + `fedftg`", "ce+fedftg"), ("`pgd-at`", "pgd-at"),
               ("`pgd-at` + `fedftg`", "pgd-at+fedftg"),
               ("`pgd-at` + `fedftg-robust`", "pgd-at+fedftg-robust"),
               ("`pmafl`", "pmafl"), ("`pmafl` + `fedftg`", "pmafl+fedftg"),
               ("`pmafl` + `fedftg-robust`", "pmafl+fedftg-robust")]
FASHION_METHODS = ["ce", "pgd-at", "fat", "trades", "mart", "calfat", "pmafl"]


def rule(candidates: list[tuple[str, str, str]], grid_folder: str, baselines: tuple[str, ...],
         default_digits: str = "digits", seeds: tuple[int, ...] = (0, 1, 2)) -> Callable[[], str]:
    """The rule of docs/fashion-mnist.md that picks the default objective, applied to the committed
    cells. Each candidate is (label, its Fashion-MNIST grid folder, its digits grid folder), all
    runs of method `pmafl`; the baselines are methods of `grid_folder`; only cells of `seeds` count.
    AutoAttack: the candidate's mean beats each baseline's mean by more than the larger of the two
    sample standard deviations; clean: at most 2 points below the best baseline's mean; digits: mean
    clean and AutoAttack each at least the default's mean minus its std. A clause is decided once
    every seed of what it compares is in, and the pick once no candidate is open; before that the
    table shows where each candidate stands. Comparisons are rounded to 1e-9, so that an exact tie
    (means of k/n accuracies) is not decided by floating-point error."""
    def render() -> str:
        src = Sources()

        def cells(folder: str, method: str) -> list[dict[str, Any]]:
            return [r for r in src.runs(folder, method, optional=True) if r["cell"]["seed"] in seeds]

        def stats(runs: list[dict[str, Any]], c: str) -> tuple[float, float | None]:
            v = [r[COLUMNS[c][0]] for r in runs]
            return statistics.mean(v), statistics.stdev(v) if len(v) > 1 else None

        def lacking(runs: list[dict[str, Any]]) -> list[int]:
            return [s for s in seeds if s not in {r["cell"]["seed"] for r in runs}]

        def above(x: float, y: float) -> bool:
            return round(x - y, 9) > 0

        base = {m: cells(grid_folder, m) for m in baselines}
        base_done = not any(lacking(r) for r in base.values())
        present = {m: r for m, r in base.items() if r}
        default = cells(default_digits, "pmafl")
        if lacking(default):
            raise SystemExit(f"docs/results/{default_digits}: the default's digits cells lack seeds "
                             f"{lacking(default)}; the digits floor needs all of {list(seeds)}")
        floor = {c: stats(default, c)[0] - stats(default, c)[1] for c in ("clean", "aa")}
        body, qualified, still_open = [], [], []
        for label, folder, digits_folder in candidates:
            runs, digits = cells(folder, "pmafl"), cells(digits_folder, "pmafl")
            fashion_done = base_done and not lacking(runs)
            failed, behind, wants = [], [], []
            aa_text = clean_text = digits_text = "-"
            if runs and present:
                aa, aa_sd = stats(runs, "aa")
                margins = []  # (lead in points, the larger std known in points, baseline)
                for m, r in present.items():
                    b, b_sd = stats(r, "aa")
                    sds = [x * 100 for x in (aa_sd, b_sd) if x is not None]
                    margins.append(((aa - b) * 100, max(sds) if sds else None, m))
                lead, need, m = min(margins, key=lambda x: x[0] - (x[1] or 0))
                aa_text = f"{_points(lead)} over `{m}` (" + (
                    f"needs more than {need:.1f})" if need is not None else "no std from one seed)")
                gap = (stats(runs, "clean")[0] - max(stats(r, "clean")[0] for r in present.values())) * 100
                clean_text = f"{_points(gap)} (allowed -2.0)"
                (failed if fashion_done else behind).extend(
                    ["AutoAttack"] * (not above(lead, need or 0)) + ["clean"] * above(-2, gap))
            if lacking(runs):
                wants.append(f"its seed{'s' * (len(lacking(runs)) > 1)} "
                             + ", ".join(map(str, lacking(runs))))
            if digits:
                d = {c: stats(digits, c)[0] for c in ("clean", "aa")}
                digits_text = " / ".join(f"{d[c]:.3f} ({'<' if above(floor[c], d[c]) else '≥'} "
                                         f"{floor[c]:.3f})" for c in ("clean", "aa"))
                (behind if lacking(digits) else failed).extend(
                    f"digits {COLUMNS[c][1]}" for c in ("clean", "aa") if above(floor[c], d[c]))
            if not digits or lacking(digits):
                wants.append("its digits cells")
            if failed:
                verdict = "fails on " + ", ".join(failed) + (
                    f"; behind so far on {', '.join(behind)}" if behind else "")
            elif wants or not fashion_done:
                verdict = "open" + (f", behind so far on {', '.join(behind)}" if behind else "") + \
                    (f"; needs {', '.join(wants)}" if wants else "")
                still_open.append(label)
            else:
                verdict = "qualifies"
                qualified.append((stats(runs, "aa")[0], label))
            body.append([label, str(len(runs)), aa_text, clean_text, digits_text, verdict])
        header = ["candidate", "seeds", "AutoAttack lead over the deciding baseline, points",
                  "clean against the best baseline, points", "digits clean / AutoAttack (floor)", "verdict"]
        todo = [f"`{m}` seed{'s' * (len(lacking(r)) > 1)} {', '.join(map(str, lacking(r)))}"
                for m, r in base.items() if lacking(r)]
        best = max(qualified)[1] if qualified else ""
        if still_open:
            outcome = (f"Not decided yet ({', '.join(still_open)} open"
                       + (f"; {best} qualifies so far" if best else "") + "): the default stays `pmafl`.")
        elif best:
            outcome = f"The rule picks {best}."
        else:
            outcome = "No candidate qualifies: the default stays `pmafl`."
        if todo:
            outcome += " Baseline cells still to run: " + "; ".join(todo) + "."
        return _table(header, body) + "\n" + outcome + "\n" + src.caption()
    return render


def _kdiga(data: str, pmafl_folder: str) -> list[tuple[str, str, str]]:
    return [("plain KD (`kdiga`, weight 0)", f"kdiga-{data}/weight0", "kdiga"),
            ("`kdiga`, weight 3", f"kdiga-{data}/weight3", "kdiga"),
            ("`pmafl`", pmafl_folder, "pmafl"),
            ("`pmafl` + `kdiga-weight=1`", f"kdiga-{data}/weight1", "pmafl")]


def _robustkd(data: str) -> list[tuple[str, str, str]]:
    return [("no teacher: `pgd-at`", f"robustkd-{data}/backdoor", "pgd-at"),
            ("backdoored teacher: `pmafl`", f"robustkd-{data}/backdoor", "pmafl"),
            ("backdoored teacher: `pmafl` + RobustKD", f"robustkd-{data}/backdoor-robustkd", "pmafl")]


TABLES: dict[str, Callable[[], str]] = {
    "overview": overview,
    "digits": grid([("`ce` (FedAvg)", "digits", "ce"), ("`pgd-at` (FedAvg + PGD-AT)", "digits", "pgd-at"),
                    ("`trades` (beta 6)", "digits", "trades"), ("`pmafl` (the default)", "digits", "pmafl")]),
    "fashion": warnings_grid("fashion-mnist", FASHION_METHODS),
    "fashion-seeds": per_seed("fashion-mnist", FASHION_METHODS),
    "fedftg-digits": grid([(label, "fedftg-digits", m) for label, m in FEDFTG_ROWS]),
    "fedftg-fashion": grid([(label, "fedftg-fashion", m) for label, m in FEDFTG_ROWS]),
    "fedftg-fashion-change": paired([
        (f"`{ft}` around `{base}`", ("fedftg-fashion", f"{base}+{ft}"), ("fedftg-fashion", base))
        for base, ft in (("ce", "fedftg"), ("pgd-at", "fedftg"), ("pgd-at", "fedftg-robust"),
                         ("pmafl", "fedftg"), ("pmafl", "fedftg-robust"))]),
    "kdiga-digits": grid(_kdiga("digits", "kdiga-digits/weight0"), first="run", teacher="digits"),
    "kdiga-fashion": grid(_kdiga("fashion", "fashion-mnist"), first="run", teacher="fashion-mnist"),
    "kdiga-fashion-change": paired([
        ("alignment weight 3 on plain KD", ("kdiga-fashion/weight3", "kdiga"),
         ("kdiga-fashion/weight0", "kdiga")),
        ("`kdiga-weight=1` on PM-AFL", ("kdiga-fashion/weight1", "pmafl"), ("fashion-mnist", "pmafl"))]),
    "robustkd-vet-digits": vetting("digits"),
    "robustkd-vet-fashion": vetting("fashion"),
    "robustkd-digits": grid(_robustkd("digits") + [
        ("clean teacher: `pmafl`", "robustkd-digits/clean", "pmafl"),
        ("clean teacher: `pmafl` + RobustKD", "robustkd-digits/clean-robustkd", "pmafl")],
        columns=(*ALL, "asr"), first="run"),
    "robustkd-unstamped": grid([("backdoored teacher, clean client images: `pmafl`",
                                 "robustkd-digits/backdoor-unstamped", "pmafl"),
                                ("clean teacher: `pmafl` (the digits grid)", "digits", "pmafl")],
                               columns=("clean", "pgd20", "aa", "asr"), first="run", bold=False),
    "robustkd-fashion": grid(_robustkd("fashion"), columns=(*ALL, "asr"), first="run"),
    "compression": compression,
    "ablation-digits": single_seed([("(none: lambda 0.01, grad-clip 5, tau 1)", "digits"),
                                    *((ABLATIONS[n].replace("--set ", ""), f"ablation-digits/{n}")
                                      for n in ABLATIONS)]),
    "fast-at-digits": grid([("`pmafl`, PGD-10 (the default)", "digits", "pmafl"),
                            ("`pmafl`, FGSM-RS", "fgsm-rs-digits", "pmafl"),
                            ("`pgd-at`, PGD-10", "digits", "pgd-at"),
                            ("`pgd-at`, FGSM-RS", "fgsm-rs-digits", "pgd-at")],
                           columns=("clean", "pgd20", "aa", "worst"), first="run", bold=False),
    "step-time": step_time("cpu-28x28"),
    "fedftg-cost": fedftg_cost,
    "deployment-speed": deployment_speed,
    "scale": scale,
    "evaluation": evaluation,
    "hostile-digits": hostile(("default", "hostile-digits"), ("weight-cap 4", "hostile-digits-cap4"),
                              ("median", "hostile-digits-median"),
                              ("trimmed-mean", "hostile-digits-trimmed-mean"),
                              ("no defence", "hostile-digits-nodefence")),
    "hostile-fashion": hostile(("default", "hostile-fashion")),
    "defaults-cost": honest_cost,
    "teacher-study-fashion": teacher_study("teacher-study-fashion"),
    "worst-node-digits": worst_node("digits-pmafl-seed0"),
    "worst-node-digits-pgd-at": worst_node("digits-pgd-at-seed0"),
    "worst-node-fashion": worst_node("fashion-pmafl-seed0"),
    "curves-fashion-2000": curves("fashion-2000"),
    "fair-digits": grid([("`pmafl` (the default)", "digits", "pmafl"),
                         ("`pmafl`, `fair-q=5`", "fair-digits", "pmafl")],
                        columns=("clean", "pgd20", "aa", "nodes", "worst"), first="run", bold=False),
    "fair-digits-change": paired([("`fair-q=5`", ("fair-digits", "pmafl"), ("digits", "pmafl"))],
                                 columns=("clean", "pgd20", "aa", "nodes", "worst")),
    "fashion-6000": grid([(f"`{m}`", "fashion-6000/grid", m) for m in ("fat", "trades")]
                         + [("`pmafl` (the default)", "fashion-6000/grid", "pmafl"),
                            ("`pmafl` + KDIGA (`kdiga-weight=1`)", "fashion-6000/kdiga1", "pmafl"),
                            ("`pmafl` + KDIGA + CE (`kdiga-weight=1 ce-weight=1`)", "fashion-6000/kdiga1-ce1",
                             "pmafl")],
                         cost=True),
    "rule-fashion-6000": rule([("`pmafl` (the default)", "fashion-6000/grid", "digits"),
                               ("`pmafl` + KDIGA", "fashion-6000/kdiga1", "rule-digits/kdiga1"),
                               ("`pmafl` + KDIGA + CE", "fashion-6000/kdiga1-ce1", "rule-digits/kdiga1-ce1")],
                              "fashion-6000/grid", ("pgd-at", "fat", "trades", "calfat")),
    "curves-fashion-6000": curves("fashion-6000"),
    "probes-fashion-6000": curves("probes-fashion-6000", at=(5, 10, 15)),
    "fair-fashion": grid([("`pmafl` (the default)", "defaults-fashion", "pmafl"),
                          ("`pmafl`, `fair-q=5`", "fair-fashion", "pmafl")],
                         columns=("clean", "pgd20", "aa", "nodes", "worst"), first="run", bold=False),
    "fair-fashion-change": paired([("`fair-q=5`", ("fair-fashion", "pmafl"),
                                    ("defaults-fashion", "pmafl"))],
                                  columns=("clean", "pgd20", "aa", "nodes", "worst")),
}

_BLOCK = re.compile(r"(<!-- table: ([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)


def render(text: str, where: str) -> str:
    """`text` with every generated table rewritten; an unknown NAME is an error naming the file."""
    def one(match: re.Match[str]) -> str:
        name = match.group(2)
        if name not in TABLES:
            raise SystemExit(f"{where}: table '{name}' is not one of bench/report.py's: "
                             f"{', '.join(TABLES)}")
        return match.group(1) + TABLES[name]() + match.group(4)
    return _BLOCK.sub(one, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a table differs from what its data gives")
    args = parser.parse_args(argv)
    stale, tables = [], 0
    for path in DOCS:
        text = path.read_text()
        tables += len(_BLOCK.findall(text))
        new = render(text, str(path.relative_to(ROOT)))
        if new == text:
            continue
        names = [m.group(2) for m, n in zip(_BLOCK.finditer(text), _BLOCK.finditer(new), strict=True)
                 if m.group(0) != n.group(0)]
        stale += [f"{path.relative_to(ROOT)}: {name}" for name in names]
        if not args.check:
            path.write_text(new)
    if args.check and stale:
        print("tables that differ from the committed results (python bench/report.py rewrites them):\n  "
              + "\n  ".join(stale))
        return 1
    print(f"{'checked' if args.check else 'wrote'} {tables} generated tables"
          + (f"; rewrote: {', '.join(stale)}" if stale and not args.check else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
