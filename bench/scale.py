"""Does a round cost what its participants cost, whatever the federation's size? Two Ray
simulations of the default PM-AFL app, one after the other, with the same data per node:

* small: `--small` nodes (default 10), all of them trained and evaluated every round;
* large: `--large` nodes (default 100), `fraction-train` = `fraction-evaluate` = small / large,
  so the same number of nodes take part in a round.

Every node holds `--per-node` training examples (`max-train-examples` = nodes x per-node, IID
partitions, so that a hundred partitions of a small dataset are not empty). Per run it prints
the rounds' wall time and the peak resident memory of one Ray worker (read from /proc: Linux),
then the ratio large / small of the median round time, measured in this run.

    python bench/scale.py                               # 10 vs 100 nodes, 5 rounds, digits
    python bench/scale.py --rounds 3 --set "dataset='fashion-mnist'" --per-node 60
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
from pathlib import Path

from deployment import run


def ray_worker_rss() -> list[int]:
    """Resident bytes of each running Ray worker process (`ray::...` in its command line)."""
    sizes = []
    for proc in Path("/proc").iterdir():
        try:
            if not (proc / "cmdline").read_bytes().startswith(b"ray::"):
                continue
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    sizes.append(int(line.split()[1]) * 1024)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return sizes


class PeakWorkerMemory(threading.Thread):
    """Samples `ray_worker_rss` every second until stopped; `peak` is the largest single worker."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.workers, self._done = 0, 0, threading.Event()

    def run(self) -> None:
        while not self._done.wait(1.0):
            sizes = ray_worker_rss()
            self.peak = max([self.peak, *sizes])
            self.workers = max(self.workers, len(sizes))

    def stop(self) -> None:
        self._done.set()
        self.join()


def simulate(nodes: int, participants: int, base: Path, args: argparse.Namespace) -> dict[str, float]:
    share = participants / nodes
    overrides = [f"max-train-examples={nodes * args.per_node}", "partitioner='iid'",
                 f"fraction-train={share:g}", f"fraction-evaluate={share:g}",
                 f"min-train-nodes={min(2, participants)}", *args.set]
    run_args = argparse.Namespace(nodes=nodes, rounds=args.rounds, set=overrides, timeout=args.timeout)
    memory = PeakWorkerMemory()
    memory.start()
    try:
        rows = run("simulation", base / f"{nodes}-nodes", run_args)
    finally:
        memory.stop()
    print(f"\n{nodes} nodes, {participants} per round: round  wall_s  train_exchange_s  "
          "slowest_train_s  train_replies")
    for r in rows:
        print(f"{'':>{len(str(nodes)) + 19 + len(str(participants))}}{r['round']:>5}  "
              f"{r['round_seconds']:>6.2f}  {r['train_seconds']:>16.2f}  "
              f"{r['train_compute_seconds']:>15.2f}  {r.get('train_replies', '-'):>12}")
    later = rows[1:] or rows  # round 1 pays Ray's start-up
    print(f"peak memory of one Ray worker: {memory.peak / 2**20:.0f} MiB "
          f"({memory.workers} workers at most)")
    return {"round": statistics.median(r["round_seconds"] for r in later), "memory": memory.peak,
            "workers": memory.workers, "first_round": rows[0]["round_seconds"] if rows else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--small", type=int, default=10, help="nodes of the full-participation run")
    parser.add_argument("--large", type=int, default=100, help="nodes of the partial-participation run")
    parser.add_argument("--per-node", type=int, default=10, help="training examples per node")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per run (default 5)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config override for both runs, TOML value syntax; repeatable")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per flwr run")
    parser.add_argument("--keep", action="store_true", help="keep the logs' folder")
    parser.add_argument("--out", type=Path, help="also write the medians as JSON (docs/results/...)")
    args = parser.parse_args()
    if not 0 < args.small <= args.large:
        parser.error(f"--small must be in [1, --large], got {args.small}")
    base = Path(tempfile.mkdtemp(prefix="pmafl-bench-scale-"))
    try:
        small = simulate(args.small, args.small, base, args)
        large = simulate(args.large, args.small, base, args)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(f"\nmedian round time over rounds 2 and later: {small['round']:.2f} s with {args.small} "
          f"nodes, {large['round']:.2f} s with {args.large} nodes at {args.small} per round")
    print(f"  large / small round time: {large['round'] / small['round']:.2f}")
    print(f"  large / small peak Ray worker memory: {large['memory'] / max(small['memory'], 1):.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"small": args.small, "large": args.large, "per_node": args.per_node,
                  "rounds": args.rounds, "overrides": args.set, "cpus": os.cpu_count(),
                  "runs": {"small": small, "large": large}}
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
