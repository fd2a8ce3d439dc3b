"""One real `flwr run` simulation (Ray) against a private SuperLink, checking results.json."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from loopback import free_ports, wait_for_port

from pmafl.results import checkpoint_files, without_timing

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture
def superlink(tmp_path):
    """A simulation SuperLink of our own (not the machine-wide local one), and a FLWR_HOME that
    points the CLI at it. Stopped with its whole process group, also on failure."""
    http, control, fleet, health = free_ports(4)
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{http}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    log = (tmp_path / "superlink.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
         "--host", "127.0.0.1", "--port", str(http), "--control-api-address", f"127.0.0.1:{control}",
         "--fleet-api-address", f"127.0.0.1:{fleet}", "--health-server-address", f"127.0.0.1:{health}",
         "--database", str(tmp_path / "superlink.db"), "--disable-runtime-dependency-installation"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(http, lambda: (tmp_path / "superlink.log").read_text())
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def flwr_run_command(app, results_dir, teachers, extra=""):
    overrides = (f"num-server-rounds=3 local-epochs=1 teacher-epochs=2 teacher-objective='ce' "
                 f"pgd-steps=3 eval-steps=5 federated-eval-every=2 teacher-cache-dir='{teachers}' "
                 f"results-dir='{results_dir}' {extra}")
    return [str(BIN / "flwr"), "run", str(app), "test", "--stream", "--federation-config",
            "num-supernodes=3 client-resources-num-cpus=1", "--run-config", overrides]


def flwr_run(env, app, results_dir, teachers, extra=""):
    run = subprocess.run(flwr_run_command(app, results_dir, teachers, extra), env=env,
                         capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    deadline = time.time() + 60  # the stream can end a moment before the ServerApp's last write
    while time.time() < deadline and not list(results_dir.glob("*/results.json")):
        time.sleep(1)
    [folder] = [p.parent for p in results_dir.glob("*-pmafl-seed0/results.json")]
    return folder, json.loads((folder / "results.json").read_text())


def test_flwr_run_simulation_writes_results_and_repeats_them(superlink, app, tmp_path):
    folder, results = flwr_run(superlink, app, tmp_path / "first", tmp_path / "teachers")
    assert results["config"]["num-server-rounds"] == 3 and results["config"]["objective"] == "pmafl"
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2, 3]
    for row in results["rounds"]:
        assert 0.0 <= row["clean_acc"] <= 1.0 and 0.0 <= row["pgd_acc"] <= 1.0
    for row in results["rounds"][1:]:
        assert row["failures"] == []
        assert {"loss", "loss_vkd", "loss_akd", "loss_alg"} <= set(row)
    # Federated evaluation in round 2 (every 2nd) and 3 (the last), on all 3 nodes.
    assert [r["round"] for r in results["rounds"] if "fed_pgd_acc" in r] == [2, 3]
    assert all(r["fed_num_clients"] == 3 for r in results["rounds"] if "fed_pgd_acc" in r)
    assert (folder / "model.pt").stat().st_size > 0
    assert (folder / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Same seed, same results: Ray hands nodes to worker processes in another order this time.
    _, again = flwr_run(superlink, app, tmp_path / "second", tmp_path / "teachers")
    assert without_timing(again["rounds"]) == without_timing(results["rounds"])

    # The ServerApp killed after round 1's checkpoint, then resumed: the same rounds again.
    killed_dir = tmp_path / "killed"
    run = subprocess.Popen(flwr_run_command(app, killed_dir, tmp_path / "teachers"), env=superlink,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list(killed_dir.glob("*/checkpoint-round*.pt")):
            time.sleep(0.2)
        killed = kill_serverapp(superlink)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    assert killed, "no ServerApp process found to kill"
    [folder] = {p.parent for p in killed_dir.glob("*/checkpoint-round*.pt")}
    assert not (folder / "results.json").exists()
    resumed_round = torch.load(checkpoint_files(folder)[-1], weights_only=True)["round"]
    assert resumed_round < 3
    _, resumed = flwr_run(superlink, app, killed_dir, tmp_path / "teachers",
                          extra=f"resume-from='{folder}'")
    assert without_timing(resumed["rounds"]) == without_timing(results["rounds"])


def kill_serverapp(env, program="flwr-simulation"):
    """SIGKILL the process that runs the ServerApp for our SuperLink (`flwr-simulation` in
    simulation, with the ClientApps; `flwr-serverapp` in deployment)."""
    home = Path(env["FLWR_HOME"]) / "config.toml"
    port = re.search(r'address = "127.0.0.1:(\d+)"', home.read_text()).group(1)
    killed = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if program in cmdline and f"127.0.0.1:{port}" in cmdline:
            os.kill(int(pid), signal.SIGKILL)
            killed += 1
    return killed


def test_comparison_grid_runs_a_cell_then_resumes_without_rerunning_it(superlink, app, tmp_path):
    out = tmp_path / "grid"
    command = [sys.executable, str(ROOT / "bench" / "compare.py"), "--methods", "ce", "--seeds", "0",
               "--out", str(out), "--app", str(app), "--superlink", "test", "--supernodes", "3",
               "--autoattack-n", "10", "--set", "num-server-rounds=2", "--set", "local-epochs=1",
               "--set", "eval-steps=3", "--set", "federated-eval-every=1"]
    first = subprocess.run(command, env=superlink, capture_output=True, text=True, timeout=400)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    final = json.loads((out / "runs" / "ce_alpha0.5_seed0" / "final.json").read_text())
    assert final["autoattack_n"] == 10 and final["num_examples"] == 359
    assert 0 <= final["fed_worst_pgd_acc"] <= final["fed_pgd_acc"] <= 1
    assert [r["round"] for r in final["rounds"]] == [0, 1, 2]
    report = (out / "report.md").read_text()
    assert f"| 0.5 | ce | 1 | {final['clean_acc']:.3f} |" in report
    again = subprocess.run(command, env=superlink, capture_output=True, text=True, timeout=100)
    assert again.returncode == 0 and "1 already finished, 0 to run" in again.stdout
    assert len(list((out / "runs" / "ce_alpha0.5_seed0" / "results").iterdir())) == 1
