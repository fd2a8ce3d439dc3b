"""Hostile nodes against the default config: the real ServerApp and ClientApp handlers, in one
process (`inprocess.InProcessGrid`: no Ray, no SuperLink), with the first K of 10 nodes sending
an attack instead of their honest train reply. Each cell reports the final global model's clean
and PGD-20 accuracy (the ServerApp's own central evaluation), whether the run completed all its
rounds, and how many hostile replies were left out of the average.

    python bench/hostile.py                                    # digits: every attack, 1 and 3 hostile nodes
    python bench/hostile.py --set "dataset='fashion-mnist'" --out docs/results/hostile-fashion
    python bench/hostile.py --attacks scale --hostile 1 --set clip-factor=0 --set weight-cap=0  # no defence
    python bench/hostile.py --report-only --out docs/results/hostile-digits
    python bench/hostile.py --table default=docs/results/hostile-digits median=DIR  # a column each

Attacks (on every train reply of a hostile node):
  scale            its trained weights x 1e4 (finite)
  sign-flip-claim  its trained weights negated, and `num-examples` = 10**12
  float64-bytes    every float array as float64 bytes of 1e300, declared float32
  garbage-bytes    every float array's bytes random (declared float32, the right shape)
  metric-keys      the metrics carry `clean_acc` = `pgd_acc` = 1.0 (the server's own columns)
  none             an honest reply (the unpoisoned reference)

Each cell's row goes to `<out>/<attack>_hostile<K>_seed<S>.json` as soon as it finishes; a cell
with a row is skipped when the command runs again. `<out>/report.md` is the table of every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inprocess import InProcessGrid  # noqa: E402

from client_app.app import evaluate, train  # noqa: E402
from pmafl.config import RunConfig, parse_overrides  # noqa: E402
from pmafl.protocol import ARRAYS, METRICS, NUM_EXAMPLES  # noqa: E402
from server_app.app import main  # noqa: E402

ATTACKS = ("none", "scale", "sign-flip-claim", "float64-bytes", "garbage-bytes", "metric-keys")
NUM_NODES = 10


def _floats(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items() if a.numpy().dtype.kind == "f"}


def attack_reply(reply: Message, attack: str, rng: np.random.Generator) -> Message:
    """The hostile version of an honest train reply (its content changed in place)."""
    if attack == "none" or reply.has_error():
        return reply
    content = reply.content
    arrays: ArrayRecord = content[ARRAYS]
    metrics: MetricRecord = content[METRICS]
    for key, values in _floats(arrays).items():
        if attack == "scale":
            arrays[key] = Array(values * np.float32(1e4))
        elif attack == "sign-flip-claim":
            arrays[key] = Array(-values)
        elif attack == "float64-bytes":
            forged = Array(np.full(values.shape, 1e300))
            arrays[key] = Array(dtype=str(values.dtype), shape=values.shape, stype=forged.stype,
                                data=forged.data)
        elif attack == "garbage-bytes":
            honest = Array(values)
            arrays[key] = Array(dtype=honest.dtype, shape=honest.shape, stype=honest.stype,
                                data=rng.bytes(len(honest.data)))
    if attack == "sign-flip-claim":
        metrics[NUM_EXAMPLES] = 10**12
    if attack == "metric-keys":
        metrics["clean_acc"] = metrics["pgd_acc"] = 1.0
    return reply


def run_cell(attack: str, hostile: int, seed: int, overrides: dict[str, Any], rounds: int,
             work: Path) -> dict[str, Any]:
    run_config = {**overrides, "seed": seed, "num-server-rounds": rounds,
                  "results-dir": str(work / "results")}
    cfg = RunConfig.from_mapping(run_config)  # a bad key fails here, before any work
    rng = np.random.default_rng(seed)
    nodes = {1000 + i: {"partition-id": i, "num-partitions": NUM_NODES} for i in range(NUM_NODES)}
    hostile_ids = set(list(nodes)[:hostile])

    def hostile_train(msg: Message, context: Context) -> Message:
        honest = train(msg, context)
        return attack_reply(honest, attack, rng) if context.node_id in hostile_ids else honest

    grid = InProcessGrid({"train": hostile_train, "evaluate": evaluate}, nodes, run_config)
    start = time.time()
    error = ""
    try:
        main(grid, grid.contexts[1000])
    except Exception as e:  # noqa: BLE001 - a run the attack ended is a result, not a crash here
        error = f"{type(e).__name__}: {str(e)[:300]}"
    seconds = time.time() - start
    found = list((work / "results").glob("*/results.json"))
    results = json.loads(found[0].read_text()) if found else {"rounds": []}
    rows = results["rounds"]
    last = rows[-1] if rows else {}
    left_out = sum(1 for row in rows for f in row["failures"] if f["node"] in hostile_ids)
    return {"attack": attack, "hostile": hostile, "seed": seed, "dataset": cfg.dataset,
            "rounds": rounds, "completed": len(rows) == rounds + 1 and "stopped" not in results and not error,
            "rounds_done": max(0, len(rows) - 1), "error": error or results.get("stopped", ""),
            "clean_acc": last.get("clean_acc"), "pgd_acc": last.get("pgd_acc"),
            "eval_examples": last.get("eval_examples"),
            "hostile_replies_left_out": left_out, "hostile_replies": hostile * rounds,
            "overrides": overrides, "seconds": round(seconds, 1)}


def read_rows(out: Path) -> list[dict[str, Any]]:
    """The finished cells' rows of a result folder."""
    return [json.loads(p.read_text()) for p in sorted(out.glob("*_hostile*_seed*.json"))]


def report(out: Path) -> str:
    rows = read_rows(out)
    if not rows:
        return "no finished cells"
    first = rows[0]
    lines = [f"Hostile nodes on {first['dataset']}: 10 nodes, the first K hostile, {first['rounds']} "
             f"rounds, overrides {first['overrides'] or 'none (the default config)'}; final global "
             f"model on {first['eval_examples']} test images. Produced by bench/hostile.py.", "",
             "| attack | hostile nodes | seed | completed | clean | PGD-20 | hostile replies left out |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    order = {name: i for i, name in enumerate(ATTACKS)}
    def acc(value: float | None) -> str:
        return f"{value:.3f}" if value is not None else "-"

    for r in sorted(rows, key=lambda r: (order[r["attack"]], r["hostile"], r["seed"])):
        done = "yes" if r["completed"] else f"no, after {r['rounds_done']} rounds ({r['error']})"
        lines.append(f"| {r['attack']} | {r['hostile'] if r['attack'] != 'none' else 0} | {r['seed']} | "
                     f"{done} | {acc(r['clean_acc'])} | {acc(r['pgd_acc'])} | "
                     f"{r['hostile_replies_left_out']} of {r['hostile_replies']} |")
    return "\n".join(lines) + "\n"


def table(columns: list[tuple[str, list[dict[str, Any]]]]) -> str:
    """One markdown table of several result folders' rows (`read_rows`), a column each: final
    clean / PGD-20 of every (attack, hostile nodes) cell, "stopped after N rounds" for a run that
    did not complete."""
    found = {label: {(r["attack"], r["hostile"]): r for r in rows} for label, rows in columns}
    order = {name: i for i, name in enumerate(ATTACKS)}
    cells = sorted({cell for rows in found.values() for cell in rows}, key=lambda c: (order[c[0]], c[1]))
    lines = ["| attack | hostile of 10 | " + " | ".join(label for label, _ in columns) + " |",
             "| --- | --- |" + " --- |" * len(columns)]
    for cell in cells:
        shown = []
        for label, _ in columns:
            r = found[label].get(cell)
            if r is None:
                shown.append("")
            elif not r["completed"]:
                shown.append(f"stopped after {r['rounds_done']} rounds")
            else:
                shown.append(f"{r['clean_acc']:.3f} / {r['pgd_acc']:.3f}")
        lines.append(f"| {cell[0]} | {cell[1]} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--attacks", default=",".join(ATTACKS),
                        help=f"comma-separated, from {', '.join(ATTACKS)} (default: all)")
    parser.add_argument("--hostile", default="1,3", help="hostile node counts of 10 (default 1,3)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--rounds", type=int, default=30,
                        help="federated rounds (default 30, the default config's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config override in --run-config syntax (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "hostile-digits")
    parser.add_argument("--report-only", action="store_true", help="rebuild report.md from the rows")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--table", nargs="+", metavar="LABEL=DIR",
                        help="print one table of these result folders (a column each) and exit")
    args = parser.parse_args()
    if args.table:
        print(table([(label, read_rows(Path(folder))) for label, folder in
                     (item.rsplit("=", 1) for item in args.table)]), end="")
        return
    # One process trains all ten nodes in turn: one torch thread is as fast on an idle 2-core
    # machine and several times faster on a busy one (oversubscribed threads spin).
    torch.set_num_threads(args.threads)
    attacks = args.attacks.split(",")
    unknown = sorted(set(attacks) - set(ATTACKS))
    if unknown:
        parser.error(f"--attacks: unknown {unknown}; known: {', '.join(ATTACKS)}")
    overrides = parse_overrides(args.set, "--set")
    RunConfig.from_mapping(overrides, "--set")  # a bad key fails here, before any cell runs
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        counts = [int(k) for k in args.hostile.split(",")]
        cells = [(a, k if a != "none" else 0, int(s)) for a in attacks
                 for k in (counts if a != "none" else [0]) for s in args.seeds.split(",")]
        for i, (attack, hostile, seed) in enumerate(cells, 1):
            path = args.out / f"{attack}_hostile{hostile}_seed{seed}.json"
            if path.exists():
                print(f"[{i}/{len(cells)}] {path.name}: done before, skipped", flush=True)
                continue
            print(f"[{i}/{len(cells)}] {attack}, {hostile} hostile of {NUM_NODES}, seed {seed}...",
                  flush=True)
            with tempfile.TemporaryDirectory() as work:
                row = run_cell(attack, hostile, seed, overrides, args.rounds, Path(work))
            path.write_text(json.dumps(row, indent=2) + "\n")
            print(f"    completed {row['completed']}, clean {row['clean_acc']}, PGD-20 {row['pgd_acc']}, "
                  f"{row['hostile_replies_left_out']} of {row['hostile_replies']} hostile replies left "
                  f"out ({row['seconds']:.0f}s)", flush=True)
    text = report(args.out)
    (args.out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main_cli()
