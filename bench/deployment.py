"""Where a round's time goes: the deployment topology as real processes on loopback, and the Ray
simulation of the same run, side by side.

Deployment: an insecure SuperLink, `--nodes` SuperNodes (`--isolation process`, each with its own
ClientApp SuperExec, as in docker/compose.yml) and `flwr run` against them; a cold deployment is
the same without the nodes' warm workers (`warm-worker=false`: every message's fresh ClientApp
process imports torch and loads what it needs itself). Simulation: a
simulation SuperLink and `flwr run --federation-config "num-supernodes=N"`. Both run the default
PM-AFL app with the run config below; the rounds' timing comes from results.json (`round_seconds`,
the train and evaluate exchanges, the slowest node's own `..._compute_seconds`).

Per round it prints the round's wall time, the slowest node's compute in the train and evaluate
exchanges, and the overhead: exchange time minus the slowest node's compute, i.e. process
start-up, imports, data, the Grid's polling and the SuperNode's own wait for messages (Flower's
fixed 3 s sleep when it finds none, which no app can change). It also prints the longest ClientApp
start-up of the train exchange (a fresh process's start to its first training step, the replies'
`startup-seconds`), against a fresh interpreter's `import torch` timed here. Then the figures,
measured in this run: deployment round time / simulation round time, overhead per round, and
start-up beyond `import torch`.

The SuperExecs look for work every 0.1 s, as the docker image sets them to
(`FLWR_SUPEREXEC_TASK_POLL_INTERVAL`; Flower's default is 1 s: set it in the environment to
measure another value).

    python bench/deployment.py                          # 3 nodes, 6 rounds
    python bench/deployment.py --nodes 10 --rounds 3 --set local-epochs=1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "bench"))

from loopback import Processes, free_ports, wait_for_port  # noqa: E402

KINDS = ("deployment", "cold-deployment", "simulation")
SUPEREXEC_POLL = os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")


def start_federation(procs: Processes, folder: Path, kind: str, nodes: int) -> None:
    """An insecure SuperLink on free ports (the CLI's connection `bench` points at it) and, for a
    deployment, the ServerApp's SuperExec and `nodes` SuperNodes with their SuperExecs. Each node's
    ClientApps get an equal share of this host's cores (`num-threads`); a cold deployment's nodes
    run without the warm worker (`warm-worker=false`)."""
    simulation = kind == "simulation"
    http, control, fleet, health = free_ports(4)
    (folder / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{http}"\n'
        "insecure = true\n")
    procs.start("superlink", [
        str(BIN / "flower-superlink"), "--insecure", *(["--simulation"] if simulation else []),
        "--isolation", "subprocess" if simulation else "process", "--host", "127.0.0.1",
        "--port", str(http), "--control-api-address", f"127.0.0.1:{control}",
        "--fleet-api-address", f"127.0.0.1:{fleet}", "--health-server-address", f"127.0.0.1:{health}",
        "--database", str(folder / "superlink.db"), "--disable-runtime-dependency-installation"])
    wait_for_port(http)
    if not simulation:
        procs.start("superexec-serverapp", [str(BIN / "flower-superexec"), "--insecure",
                                            "--runtime-api-address", f"127.0.0.1:{http}"])
        threads = max(1, (os.cpu_count() or 1) // nodes)
        for i, port in enumerate(free_ports(nodes)):
            procs.start(f"node{i}", [
                str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{http}",
                "--isolation", "process", "--port", str(port), "--node-config",
                f"partition-id={i} num-partitions={nodes} num-threads={threads}"
                + (" warm-worker=false" if kind == "cold-deployment" else "")])
            procs.start(f"node{i}-superexec", [str(BIN / "flower-superexec"), "--insecure",
                                               "--runtime-api-address", f"127.0.0.1:{port}"])


def import_torch_seconds(repeats: int = 3) -> float:
    """Median wall time of a fresh interpreter that imports torch: the floor of any ClientApp's
    start-up."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(kind: str, base: Path, args: argparse.Namespace) -> list[dict]:
    """One `flwr run` of the app in `kind` (one of `KINDS`); its results rows."""
    folder = base / kind
    (folder / "flwr-home").mkdir(parents=True)
    env = {**os.environ, "FLWR_HOME": str(folder / "flwr-home"),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": SUPEREXEC_POLL,  # as docker/Dockerfile sets it
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    procs = Processes(folder, env)
    try:
        start_federation(procs, folder, kind, args.nodes)
        results = folder / "results"
        run_config = " ".join([f"num-server-rounds={args.rounds}", f"results-dir='{results}'",
                               f"min-available-nodes={args.nodes}", *args.set])
        command = [str(BIN / "flwr"), "run", str(ROOT), "bench", "--stream", "--run-config", run_config]
        if kind == "simulation":
            command += ["--federation-config",
                        f"num-supernodes={args.nodes} client-resources-num-cpus=1"]
        print(f"{kind}: {args.nodes} nodes, {args.rounds} rounds (logs: {folder})", flush=True)
        with (folder / "flwr-run.log").open("w") as log:
            code = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=args.timeout).returncode
        deadline = time.time() + 60  # the stream can end just before the last write
        while time.time() < deadline and not list(results.glob("*/results.json")):
            time.sleep(0.5)
        found = list(results.glob("*/results.json"))
        if code != 0 or not found:
            raise RuntimeError(f"{kind}: flwr run exited with {code}; see {folder / 'flwr-run.log'}")
        return json.loads(found[0].read_text())["rounds"][1:]
    finally:
        procs.stop_all()


def report(kind: str, rows: list[dict]) -> dict[str, float]:
    print(f"\n{kind}: round  wall_s  train_exchange_s  slowest_train_s  eval_exchange_s  "
          "slowest_eval_s  overhead_s  train_startup_s")
    overheads = []
    for r in rows:
        overhead = (r["train_seconds"] - r["train_compute_seconds"]
                    + r["evaluate_seconds"] - r["evaluate_compute_seconds"])
        overheads.append(overhead)
        print(f"{'':>{len(kind)}}  {r['round']:>5}  {r['round_seconds']:>6.2f}  "
              f"{r['train_seconds']:>16.2f}  {r['train_compute_seconds']:>15.2f}  "
              f"{r['evaluate_seconds']:>15.2f}  {r['evaluate_compute_seconds']:>14.2f}  {overhead:>10.2f}  "
              f"{r.get('train_startup_seconds', 0.0):>15.2f}")
    # Round 1 pays one-off costs (the first process per node loads the dataset, Ray starts up).
    later = rows[1:] or rows
    return {"round": statistics.median(r["round_seconds"] for r in later),
            "overhead": statistics.median(overheads[1:] or overheads),
            "exchanges": statistics.median(1 + (r["evaluate_seconds"] > 0) for r in later),
            "startup": statistics.median(r.get("train_startup_seconds", 0.0) for r in later)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--nodes", type=int, default=3, help="SuperNodes (default 3)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds (default 6)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config override, TOML value syntax; repeatable")
    parser.add_argument("--only", choices=KINDS, help="run only one of them")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per flwr run")
    parser.add_argument("--keep", action="store_true", help="keep the logs' folder")
    parser.add_argument("--out", type=Path, help="also write the medians as JSON (docs/results/...)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="pmafl-bench-deployment-"))
    torch_seconds = import_torch_seconds()
    medians = {}
    try:
        for kind in KINDS:
            if args.only in (None, kind):
                medians[kind] = report(kind, run(kind, base, args))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print("\nmedian over rounds 2 and later:")
    for kind, m in medians.items():
        print(f"  {kind}: {m['round']:.2f} s per round, overhead {m['overhead']:.2f} s "
              f"({m['exchanges']:.0f} exchanges a round; a SuperNode's own poll wait is up to 3 s "
              "each in deployment)")
    if "deployment" in medians:
        startup = medians["deployment"]["startup"]
        print(f"  deployment ClientApp start-up to its first training step: {startup:.2f} s, "
              f"{startup - torch_seconds:.2f} s beyond a fresh `import torch` ({torch_seconds:.2f} s)")
    if "cold-deployment" in medians:
        startup = medians["cold-deployment"]["startup"]
        print(f"  cold-deployment ClientApp start-up to its first training step: {startup:.2f} s, "
              f"{startup - torch_seconds:.2f} s beyond a fresh `import torch`")
    for kind in ("deployment", "cold-deployment"):
        if kind in medians and "simulation" in medians:
            print(f"  {kind} / simulation round time: "
                  f"{medians[kind]['round'] / medians['simulation']['round']:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"nodes": args.nodes, "rounds": args.rounds, "overrides": args.set,
                                        "cpus": os.cpu_count(), "import_torch_seconds": torch_seconds,
                                        "medians": medians}, indent=1) + "\n")


if __name__ == "__main__":
    main()
