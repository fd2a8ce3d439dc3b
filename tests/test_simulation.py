"""One real `flwr run` simulation (Ray) against a private SuperLink, checking results.json."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


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
         "--database", ":memory:", "--disable-runtime-dependency-installation"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", http)) == 0:
                    break
            time.sleep(0.5)
        else:
            pytest.fail(f"SuperLink did not start: {(tmp_path / 'superlink.log').read_text()[-2000:]}")
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_flwr_run_simulation_writes_results(superlink, tmp_path):
    results_dir = tmp_path / "results"
    app = tmp_path / "app"  # a copy without .venv, results/ or caches: what `flwr run` would package
    skip = shutil.ignore_patterns(".venv", ".git", "results", "__pycache__", ".flwr")
    shutil.copytree(ROOT, app, ignore=skip)
    overrides = (f"num-server-rounds=2 local-epochs=1 teacher-epochs=2 teacher-objective='ce' "
                 f"pgd-steps=3 eval-steps=5 teacher-cache-dir='{tmp_path / 'teachers'}' "
                 f"results-dir='{results_dir}'")
    run = subprocess.run(
        [str(BIN / "flwr"), "run", str(app), "test", "--stream",
         "--federation-config", "num-supernodes=3 client-resources-num-cpus=1", "--run-config", overrides],
        env=superlink, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    deadline = time.time() + 60  # the stream can end a moment before the ServerApp's last write
    while time.time() < deadline and not list(results_dir.glob("*/results.json")):
        time.sleep(1)
    [folder] = list(results_dir.glob("*-pmafl-seed0"))
    results = json.loads((folder / "results.json").read_text())
    assert results["config"]["num-server-rounds"] == 2 and results["config"]["objective"] == "pmafl"
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2]
    for row in results["rounds"]:
        assert 0.0 <= row["clean_acc"] <= 1.0 and 0.0 <= row["pgd_acc"] <= 1.0
    for row in results["rounds"][1:]:
        assert row["failures"] == []
        assert {"loss", "loss_vkd", "loss_akd", "loss_alg"} <= set(row)
    assert (folder / "model.pt").stat().st_size > 0
    assert (folder / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
