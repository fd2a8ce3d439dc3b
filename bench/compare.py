"""Compare methods on the same splits: a grid of objectives x seeds x Dirichlet alphas, each cell a
real `flwr run` (Ray simulation) followed by the attack suite on its final global model.

    python bench/compare.py                                      # ce, pgd-at, trades, pmafl; 3 seeds
    python bench/compare.py --methods pmafl,mart --alphas 0.1,0.5 --seeds 0,1
    python bench/compare.py --report-only                        # rebuild the report from disk
    python bench/compare.py --methods ce,ce+fedftg,pmafl,pmafl+fedftg-robust --alphas 0.1

A method is an objective, optionally with server-side fine-tuning: `OBJECTIVE+FINETUNE` runs the
objective with `server-finetune=FINETUNE` (`fedftg` or `fedftg-robust`).

Each cell gets a folder `<out>/runs/<method>_alpha<a>_seed<s>/` holding the run's log, its results
folder and `final.json` (clean, PGD-20, CW and AutoAttack accuracy of the final model on
`--test-n` test images, with the eps sweep and the per-round curve). `<out>/.gitignore` keeps
only `final.json` files and the report, so a grid folder inside the repository can be committed
and resumed elsewhere. A cell with `final.json` is finished and is skipped when the command runs again, so an
interrupted grid resumes where it stopped: a cell whose run finished but was not yet evaluated is
only evaluated, and a run stopped mid-way continues after its last checkpoint (`resume-from`).
The report (`<out>/report.md`: mean +- std over seeds; `<out>/rounds.png`: test accuracy per
round per method; `<out>/robust_vs_clean.png`) is rebuilt from every finished cell.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pmafl.config import ConfigError, RunConfig, parse_overrides  # noqa: E402
from pmafl.eval_cli import run as evaluate_model_file  # noqa: E402
from pmafl.fedftg import VARIANTS  # noqa: E402
from pmafl.objectives import OBJECTIVES  # noqa: E402
from pmafl.results import CheckpointError, checkpoint_files, latest_folder, load_checkpoint  # noqa: E402

# A run folder checkpointed more recently than this may belong to a run still going.
LIVE_SECONDS = 600
COLUMNS = (("clean_acc", "clean"), ("pgd20_acc", "PGD-20"), ("cw_acc", "CW"),
           ("autoattack_acc", "AutoAttack"), ("fed_worst_pgd_acc", "worst node PGD-20"))


@dataclass(frozen=True)
class Cell:
    method: str
    alpha: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}_alpha{self.alpha:g}_seed{self.seed}"

    @property
    def objective(self) -> str:
        return self.method.partition("+")[0]

    @property
    def finetune(self) -> str:
        """The method's `server-finetune`, "" for a bare objective (then `--set` decides)."""
        return self.method.partition("+")[2]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--methods", default="ce,pgd-at,trades,pmafl",
                        help=f"comma-separated objectives, from {', '.join(OBJECTIVES)}, each "
                             f"optionally +{' or +'.join(VARIANTS)} (server-side fine-tuning)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--alphas", default="0.5", help="comma-separated Dirichlet alphas (default 0.5)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "compare",
                        help="grid folder (default: results/compare)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config override for every cell, TOML value syntax "
                             "(e.g. num-server-rounds=10); repeatable")
    parser.add_argument("--supernodes", type=int, default=10, help="simulated SuperNodes (default 10)")
    parser.add_argument("--superlink", default="",
                        help="SuperLink connection name from flwr's config (default: flwr's default)")
    parser.add_argument("--app", type=Path, default=ROOT, help="the Flower app (default: this repo)")
    parser.add_argument("--client-gpus", type=float, default=None, metavar="FRACTION",
                        help="share of a GPU each simulated client gets (Flower's "
                             "client-resources-num-gpus; default: 0.2 where CUDA is available, "
                             "so five clients train at once, else 0)")
    parser.add_argument("--test-n", type=int, default=2000,
                        help="test images of the final attack suite, a fixed class-stratified "
                             "subset (default 2000; 0: the whole test split)")
    parser.add_argument("--autoattack-n", type=int, default=0,
                        help="of those, the first N AutoAttack runs on (default 0: all)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted({m.partition("+")[0] for m in methods} - set(OBJECTIVES))
    if unknown:
        parser.error(f"--methods: unknown objective {unknown[0]!r}; known: {', '.join(OBJECTIVES)}")
    unknown = sorted({m.partition("+")[2] for m in methods if "+" in m} - set(VARIANTS))
    if unknown:
        parser.error(f"--methods: unknown server fine-tuning {unknown[0]!r}; known: "
                     f"{', '.join(VARIANTS)}")
    try:
        args.cells = [Cell(m, float(a), int(s)) for a in args.alphas.split(",") if a
                      for m in methods for s in args.seeds.split(",") if s]
    except ValueError as e:
        parser.error(f"--seeds / --alphas: {e}")
    # Validate the overrides now, not after an hour of grid.
    overrides = dict(item.split("=", 1) if "=" in item else (item, "") for item in args.set)
    try:
        values = parse_overrides(args.set, "--set")
        RunConfig.from_mapping({**values, "objective": methods[0].partition("+")[0]}, where="--set")
    except ConfigError as e:
        parser.error(str(e))
    args.overrides = overrides
    if args.client_gpus is None:
        args.client_gpus = 0.2 if torch.cuda.is_available() else 0.0
    if not 0 <= args.client_gpus <= 1:
        parser.error(f"--client-gpus: expected a share of one GPU in [0, 1], got {args.client_gpus}")
    return args


def machine(client_gpus: float, superlink: str = "") -> str:
    """Where a cell ran, for the tables: the GPU its clients shared, or the CPU, of the machine
    running this script; a federation on another SuperLink is named by it."""
    if superlink:
        return f"SuperLink '{superlink}'"
    if client_gpus > 0 and torch.cuda.is_available():
        return f"GPU ({torch.cuda.get_device_name(0)})"
    return f"CPU ({os.cpu_count()} cores)"


def run_config(cell: Cell, overrides: dict[str, str], results_dir: Path) -> str:
    finetune = {"server-finetune": f"'{cell.finetune}'"} if "+" in cell.method else {}
    items = {**overrides, "objective": f"'{cell.objective}'", **finetune, "seed": str(cell.seed),
             "dirichlet-alpha": repr(cell.alpha), "results-dir": f"'{results_dir}'"}
    return " ".join(f"{k}={v}" for k, v in items.items())


def resume_from(cell: Cell, results_dir: Path, args: argparse.Namespace) -> Path | None:
    """The cell's newest run folder that holds checkpoints but no results.json, if its checkpoint
    fits the cell's config (None otherwise: the cell starts afresh, and says why).
    Refuses a folder checkpointed in the last `LIVE_SECONDS`: stopping `flwr run` stops only its
    log stream, so its run may still be writing there."""
    interrupted = sorted((f, found) for f in results_dir.glob("*") if f.is_dir()
                         if (found := checkpoint_files(f)))
    if not interrupted:
        return None
    folder, found = interrupted[-1]
    age = time.time() - found[-1].stat().st_mtime
    if age < LIVE_SECONDS:
        raise RuntimeError(f"cell {cell.name}: {folder} was checkpointed {age:.0f} s ago, so its run "
                           "may still be going (stopping `flwr run` stops only its log stream; "
                           "`flwr stop RUN_ID` stops the run); stop it or wait, then run again")
    config = RunConfig.from_mapping(parse_overrides([run_config(cell, args.overrides, results_dir)]))
    try:
        load_checkpoint(folder, config.to_dict())
    except CheckpointError as e:
        print(f"  not resuming {folder}: {e}; the cell starts afresh", flush=True)
        return None
    return folder


def run_cell(cell: Cell, folder: Path, args: argparse.Namespace) -> Path:
    """One `flwr run` of the cell; returns its results folder. A run interrupted before (its
    folder holds checkpoints but no results.json) resumes after its last checkpoint."""
    results_dir = (folder / "results").resolve()
    existing = latest_folder(results_dir)
    if existing:  # run finished before, evaluation did not
        return existing
    folder.mkdir(parents=True, exist_ok=True)
    resume = resume_from(cell, results_dir, args)
    command = ["flwr", "run", str(args.app), *([args.superlink] if args.superlink else []), "--stream",
               "--federation-config", f"num-supernodes={args.supernodes} client-resources-num-cpus=1 "
                                      f"client-resources-num-gpus={args.client_gpus}",
               "--run-config", run_config(cell, args.overrides, results_dir)
               + (f" resume-from='{resume}'" if resume else "")]
    (folder / "command.txt").write_text(" ".join(command) + "\n")
    if resume:
        print(f"  resuming {resume} after its last checkpoint", flush=True)
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with (folder / "log.txt").open("a" if resume else "w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    deadline = time.time() + 60  # the log stream can end a moment before the last write
    while time.time() < deadline and not latest_folder(results_dir):
        time.sleep(1)
    found = latest_folder(results_dir)
    if code != 0 or not found:
        # Exit 0 and no results: the simulation process died; after a killed run, the local
        # SuperLink that `flwr run` keeps can be left without its SuperExec.
        hint = (" (if the log ends at 'Starting Flower Simulation', stop the local SuperLink, "
                "`pkill -f flower-superlink`, and run again)") if code == 0 else ""
        raise RuntimeError(f"cell {cell.name}: flwr run exited with {code} and wrote "
                           f"{'no' if not found else 'a'} results.json; see {folder / 'log.txt'}{hint}")
    return found


def finish_cell(cell: Cell, folder: Path, args: argparse.Namespace) -> None:
    """Run the cell if needed, then the attack suite on its final model; writes final.json."""
    results = run_cell(cell, folder, args)
    run = json.loads((results / "results.json").read_text())
    argv = [str(results / "model.pt"), "--attacks", "pgd20,cw,autoattack", "--limit", str(args.test_n),
            "--autoattack-n", str(args.autoattack_n or 10**9), "--out", str(folder / "suite.json")]
    start = time.time()
    suite = evaluate_model_file(argv)
    suite_seconds = time.time() - start
    rounds = run["rounds"]
    last = rounds[-1]
    final = {"cell": cell.__dict__, "results": str(results), **suite,
             "fed_pgd_acc": last.get("fed_pgd_acc"), "fed_worst_pgd_acc": last.get("fed_worst_pgd_acc"),
             "overfitting_warnings": [r["warning"] for r in rounds if r.get("warning")],
             # Payload bytes over the whole run (strategies.round_loop.payload_bytes): server to clients
             # and back.
             "bytes_sent": sum(r.get("bytes_sent", 0) for r in rounds),
             "bytes_received": sum(r.get("bytes_received", 0) for r in rounds),
             # Wall time on the machine that ran the cell: the federation's rounds (the teacher's
             # pre-training, before round 1, is not in them) and the attack suite.
             "federation_seconds": round(sum(r.get("round_seconds", 0.0) for r in rounds), 1),
             "suite_seconds": round(suite_seconds, 1), "machine": machine(args.client_gpus, args.superlink),
             "rounds": [{k: r.get(k) for k in ("round", "clean_acc", "fgsm_acc", "pgd_acc", "asr",
                                               "round_seconds", "train_compute_seconds",
                                               "fedftg_seconds")
                         if k in r} for r in rounds]}
    # Written last and atomically: its presence marks the cell finished.
    tmp = folder / "final.json.tmp"
    tmp.write_text(json.dumps(final, indent=2))
    tmp.replace(folder / "final.json")


def mean_std(values: list[float]) -> str:
    """Mean ± sample std; one value alone, with no spread to show."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def report(out: Path, cells: list[Cell]) -> str:
    """report.md, rounds.png and robust_vs_clean.png from every finished cell of `cells`."""
    finals: dict[Cell, dict[str, Any]] = {}
    for cell in cells:
        path = out / "runs" / cell.name / "final.json"
        if path.is_file():
            finals[cell] = json.loads(path.read_text())
    groups: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for cell in cells:
        if cell in finals:
            groups.setdefault((cell.alpha, cell.method), []).append(finals[cell])
    # The backdoor's attack success rate, when the cells' teacher carried one.
    columns = COLUMNS + ((("asr", "backdoor ASR"),) if any("asr" in r for r in finals.values()) else ())
    megabytes = finals and all("bytes_received" in r for r in finals.values())
    lines = ["| Dirichlet alpha | method | seeds | " + " | ".join(c[1] for c in columns)
             + (" | MB up / down" if megabytes else "") + " | masking warnings | overfitting warnings |",
             "| --- | --- | --- | " + " | ".join("---" for _ in columns) + (" | ---" if megabytes else "")
             + " | --- | --- |"]
    for (alpha, method), runs in sorted(groups.items()):
        cols = [mean_std([r[key] for r in runs if r.get(key) is not None]) for key, _ in columns]
        if megabytes:  # clients to server / server to clients, whole run, mean over seeds
            cols.append(f"{statistics.mean(r['bytes_received'] for r in runs) / 1e6:.2f} / "
                        f"{statistics.mean(r['bytes_sent'] for r in runs) / 1e6:.2f}")
        masking = sum(len(r["gradient_masking_warnings"]) for r in runs)
        overfitting = sum(len(r.get("overfitting_warnings", [])) for r in runs)
        lines.append(f"| {alpha:g} | {method} | {len(runs)} | " + " | ".join(cols)
                     + f" | {masking} | {overfitting} |")
    any_final = next(iter(finals.values()), None)
    header = [f"# Comparison: {len(finals)} of {len(cells)} cells finished", ""]
    if any_final:
        aa_n = max(r.get("autoattack_n", 0) for r in finals.values())
        header += [f"Final global model of each run on the {any_final['dataset']} test split "
                   f"({any_final['num_examples']} images; AutoAttack on {aa_n}), L_inf eps "
                   f"{any_final['eps']:g}; mean ± std over seeds. Worst node: the lowest PGD-20 "
                   "accuracy among the nodes' local test splits (federated evaluation, last round).", ""]
    missing = [c.name for c in cells if c not in finals]
    text = "\n".join(header + lines + ([""] + [f"Not finished: {', '.join(missing)}"] if missing else []))
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text + "\n")
    write_gitignore(out)
    if groups:
        plot(out, groups)
    return text


def write_gitignore(out: Path) -> None:
    """A grid kept under version control (e.g. under docs/) keeps only what the report is built
    from, so that a grid spread over several sessions resumes from a fresh clone. Written before
    the first cell runs too: a grid stopped mid-cell has no run files to commit by mistake."""
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("*\n!*/\n!final.json\n!/report.md\n!/*.png\n!/.gitignore\n")


def plot(out: Path, groups: dict[tuple[float, str], list[dict[str, Any]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_clean, ax_pgd) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for (alpha, method), runs in sorted(groups.items()):
        label = f"{method} (alpha {alpha:g})"
        rounds = [r["round"] for r in runs[0]["rounds"]]
        for ax, key in ((ax_clean, "clean_acc"), (ax_pgd, "pgd_acc")):
            values = np.array([[row[key] for row in r["rounds"]] for r in runs
                               if len(r["rounds"]) == len(rounds)])
            mean = values.mean(axis=0)
            line, = ax.plot(rounds, mean, label=label)
            ax.fill_between(rounds, values.min(axis=0), values.max(axis=0), color=line.get_color(),
                            alpha=0.15)
    ax_clean.set(title="clean test accuracy", xlabel="round", ylabel="accuracy", ylim=(0, 1))
    ax_pgd.set(title="PGD-20 test accuracy", xlabel="round", ylim=(0, 1))
    for ax in (ax_clean, ax_pgd):
        ax.grid(alpha=0.3)
    ax_pgd.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "rounds.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 5))
    for (alpha, method), runs in sorted(groups.items()):
        clean = [r["clean_acc"] for r in runs]
        robust = [r["pgd20_acc"] for r in runs]
        ax.errorbar(np.mean(clean), np.mean(robust), xerr=np.std(clean), yerr=np.std(robust),
                    fmt="o", capsize=3, label=f"{method} (alpha {alpha:g})")
    ax.set(xlabel="clean accuracy", ylabel="PGD-20 accuracy", title="robust vs clean (final model)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "robust_vs_clean.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    failed = []
    if not args.report_only:
        todo = [c for c in args.cells if not (args.out / "runs" / c.name / "final.json").is_file()]
        print(f"grid: {len(args.cells)} cells, {len(args.cells) - len(todo)} already finished, "
              f"{len(todo)} to run; folder {args.out}", flush=True)
        write_gitignore(args.out)
        start = time.time()
        for i, cell in enumerate(todo, 1):
            folder = args.out / "runs" / cell.name
            print(f"[{i}/{len(todo)}] {cell.name}: flwr run + attack suite (log: {folder / 'log.txt'})",
                  flush=True)
            try:
                finish_cell(cell, folder, args)
            except RuntimeError as e:  # one failed cell does not stop the grid
                print(f"[{i}/{len(todo)}] FAILED: {e}", flush=True)
                failed.append(cell.name)
            per_cell = (time.time() - start) / i
            print(f"[{i}/{len(todo)}] done; {time.time() - start:.0f}s elapsed, about "
                  f"{per_cell * (len(todo) - i):.0f}s left", flush=True)
    text = report(args.out, args.cells)
    print(text)
    print(f"Report: {args.out / 'report.md'} (plots: rounds.png, robust_vs_clean.png)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
