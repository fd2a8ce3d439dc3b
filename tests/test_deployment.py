"""The docker compose topology as plain processes on loopback: a SuperLink with TLS and SuperNode
authentication, registered SuperNodes with their own partitions and teacher caches, `flwr run`
against it, and faults: an unregistered node, a node whose teacher does not match, and a node
killed in the middle of a round that comes back; and a ServerApp killed mid-run, resumed from its
checkpoint over the same TLS links."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from loopback import Processes, free_ports, wait_for_port
from test_simulation import BIN, ROOT, kill_serverapp

from pmafl.config import RunConfig
from pmafl.data import load_dataset
from pmafl.models import create_model
from pmafl.results import checkpoint_files
from pmafl.teacher import TeacherSettings, save_teacher, teacher_record

sys.path.insert(0, str(ROOT / "docker"))
from make_credentials import make_credentials  # noqa: E402


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def make_teacher(path: Path, seed: int) -> None:
    """An (untrained) cnn-large teacher for digits: its quality does not matter here."""
    data = load_dataset("digits")
    torch.manual_seed(seed)
    model = create_model("cnn-large", 10, 1, data.mean, data.std)
    save_teacher(model, path, teacher_record(data, TeacherSettings.from_run_config(RunConfig())))


@pytest.fixture
def deployment(tmp_path):
    """A TLS SuperLink with SuperNode authentication, and a FLWR_HOME whose connection trusts its CA."""
    http, control, fleet, health = free_ports(4)
    creds = tmp_path / "credentials"
    make_credentials(creds, nodes=5, hosts=[])
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "dep"\n\n[superlink.dep]\naddress = "127.0.0.1:{http}"\n'
        f'root-certificates = "{creds / "ca.crt"}"\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    procs = Processes(tmp_path, env)
    try:
        procs.start("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(creds / "ca.crt"),
            "--ssl-certfile", str(creds / "server.pem"), "--ssl-keyfile", str(creds / "server.key"),
            "--enable-supernode-auth", "--isolation", "process", "--host", "127.0.0.1",
            "--port", str(http), "--control-api-address", f"127.0.0.1:{control}",
            "--fleet-api-address", f"127.0.0.1:{fleet}", "--health-server-address", f"127.0.0.1:{health}",
            "--database", str(tmp_path / "superlink.db"), "--disable-runtime-dependency-installation"])
        wait_for_port(http, lambda: procs.log("superlink"))
        # The ServerApp's SuperExec, as in docker/compose.yml.
        procs.start("superexec-serverapp", [
            str(BIN / "flower-superexec"), "--runtime-api-address", f"127.0.0.1:{http}",
            "--root-certificates", str(creds / "ca.crt")])
        yield procs, creds, http
    finally:
        procs.stop_all()


def start_supernode(procs, name, creds, http, i, port, node_config, retries=3):
    """A SuperNode (isolation process) and its ClientApp SuperExec, as in docker/compose.yml."""
    node = procs.start(name, [
        str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{http}",
        "--root-certificates", str(creds / "ca.crt"), "--isolation", "process",
        "--auth-supernode-private-key", str(creds / f"supernode-{i}"), "--port", str(port),
        "--node-config", node_config, "--max-retries", str(retries)])
    procs.start(f"{name}-superexec", [str(BIN / "flower-superexec"), "--insecure",
                                      "--runtime-api-address", f"127.0.0.1:{port}"])
    return node


def test_tls_authenticated_federation_survives_faults(deployment, app, tmp_path):
    procs, creds, http = deployment
    env = procs.env

    def flwr(*args, timeout=60):
        return subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True,
                              timeout=timeout)

    node_ids = {}
    for i in range(4):  # supernode-4's key is never registered
        out = flwr("supernode", "register", str(creds / f"supernode-{i}.pub"), "dep")
        assert out.returncode == 0, out.stdout + out.stderr
        node_ids[i] = int(re.search(r"SuperNode (\d+) registered", out.stdout).group(1))

    # Each node's teacher cache is seeded from a file; node 3 gets a different teacher.
    good, other = tmp_path / "good" / "digits--cnn-large.pt", tmp_path / "other" / "digits--cnn-large.pt"
    make_teacher(good, seed=0)
    make_teacher(other, seed=1)
    for i in range(4):
        seeded = subprocess.run([sys.executable, "-m", "pmafl.teacher.cli", "import",
                                 str(other if i == 3 else good), "--cache-dir", str(tmp_path / f"node{i}")],
                                env=env, capture_output=True, text=True, timeout=120)
        assert seeded.returncode == 0, seeded.stderr
        sha256 = re.search(r"sha256 ([0-9a-f]{64})", seeded.stdout).group(1)
        if i == 0:
            expected = sha256
    ports = free_ports(6)

    def node_config(i):
        return f"partition-id={i} num-partitions=4 teacher-cache-dir='{tmp_path / f'node{i}'}'"

    for i in range(4):
        start_supernode(procs, f"node{i}", creds, http, i, ports[i], node_config(i))
    # A SuperNode whose key was not registered is refused.
    refused = start_supernode(procs, "node4", creds, http, 4, ports[4], node_config(0))
    assert refused.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in procs.log("node4")
    procs.procs.pop("node4")
    procs.kill("node4-superexec")

    results_dir = tmp_path / "results"
    run_config = (f"num-server-rounds=3 local-epochs=1 pgd-steps=2 eval-steps=3 federated-eval-every=1 "
                  f"min-train-nodes=2 min-available-nodes=4 round-timeout=60 teacher-sha256='{expected}' "
                  f"results-dir='{results_dir}'")
    run = procs.start("flwr-run", [str(BIN / "flwr"), "run", str(app), "dep", "--stream",
                                   "--run-config", run_config])
    # Kill node 1 once it has received its round-2 train message, then bring it back.
    wait_for(lambda: procs.log("node1").count("Receiving: train message") >= 2, 300,
             "node 1 to receive its round-2 train message")
    procs.kill("node1")
    procs.kill("node1-superexec")
    # The SuperLink refuses the same key while it still counts the first incarnation as online
    # (until 2 heartbeats of 30 s are missed): restart it until it is admitted, as compose's
    # `restart: unless-stopped` does.
    deadline = time.time() + 240
    while True:
        node = start_supernode(procs, "node1-again", creds, http, 1, ports[5], node_config(1))
        try:
            node.wait(timeout=15)
        except subprocess.TimeoutExpired:
            break  # admitted: it is running
        assert "Failed to activate SuperNode" in procs.log("node1-again")
        assert time.time() < deadline, "node 1 was never admitted again"
        procs.procs.pop("node1-again")
        procs.kill("node1-again-superexec")
        time.sleep(5)
    assert run.wait(timeout=400) == 0, procs.log("flwr-run")[-3000:]
    wait_for(lambda: list(results_dir.glob("*/results.json")), 60, "results.json")
    [folder] = list(results_dir.glob("*/results.json"))
    rounds = json.loads(folder.read_text())["rounds"]
    log = procs.log("flwr-run")

    def left_out(row):
        return {(f["stage"], f["node"]) for f in row["failures"]}

    # Node 3's teacher does not match: it answers with the checksum error and is left out, in
    # rounds 1 and 2; then, with no usable train reply in 2 rounds in a row (max-missed-rounds),
    # it is not sampled for a while.
    for row in rounds[1:3]:
        assert ("train", node_ids[3]) in left_out(row)
    assert re.search(rf"node {node_ids[3]} left out: .*the run expects {expected}", log)
    assert f"node {node_ids[3]} missed 2 of its rounds in a row; it is not sampled in rounds 3 to 5" in log
    # Node 1 died in round 2: the round finished with the others and the log names it.
    assert ("train", node_ids[1]) in left_out(rounds[2])
    assert f"node {node_ids[1]} left out" in log
    assert rounds[2]["clean_acc"] >= 0 and "loss" in rounds[2]
    # Back in round 3 (min-available-nodes=4 waits for it): node 1 and the two others sampled
    # (node 3 skipped), none left out.
    assert left_out(rounds[3]) == set()
    assert "round 3 train: 3 of 3 sampled nodes' replies aggregated" in log
    assert "Receiving: train message" in procs.log("node1-again")
    assert rounds[3]["fed_num_clients"] == 3


def test_a_killed_serverapp_resumes_under_tls_and_keeps_every_completed_round(deployment, app, tmp_path):
    procs, creds, http = deployment
    teacher = tmp_path / "teacher" / "digits--cnn-large.pt"
    make_teacher(teacher, seed=0)
    ports = free_ports(2)
    for i in range(2):
        out = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(creds / f"supernode-{i}.pub"),
                              "dep"], env=procs.env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        seeded = subprocess.run([sys.executable, "-m", "pmafl.teacher.cli", "import", str(teacher),
                                 "--cache-dir", str(tmp_path / f"node{i}")], env=procs.env,
                                capture_output=True, text=True, timeout=120)
        assert seeded.returncode == 0, seeded.stderr
        sha256 = re.search(r"sha256 ([0-9a-f]{64})", seeded.stdout).group(1)
        start_supernode(procs, f"node{i}", creds, http, i, ports[i],
                        f"partition-id={i} num-partitions=2 teacher-cache-dir='{tmp_path / f'node{i}'}'")
    results_dir = tmp_path / "results"
    run_config = (f"num-server-rounds=3 local-epochs=1 pgd-steps=2 eval-steps=3 federated-eval-every=0 "
                  f"round-timeout=60 teacher-sha256='{sha256}' results-dir='{results_dir}'")
    first = procs.start("flwr-run", [str(BIN / "flwr"), "run", str(app), "dep", "--stream",
                                     "--run-config", run_config])
    wait_for(lambda: list(results_dir.glob("*/checkpoint-round*.pt")), 300, "round 1's checkpoint")
    assert kill_serverapp(procs.env, "flwr-serverapp"), "no ServerApp process found to kill"
    procs.kill("flwr-run")
    assert first.returncode is not None
    [folder] = {p.parent for p in results_dir.glob("*/checkpoint-round*.pt")}
    assert not (folder / "results.json").exists()
    checkpoint = torch.load(checkpoint_files(folder)[-1], weights_only=True)
    done = json.loads(checkpoint["rounds"])
    assert checkpoint["round"] < 3 and [r["round"] for r in done] == list(range(checkpoint["round"] + 1))
    resumed = procs.start("flwr-run-resumed", [
        str(BIN / "flwr"), "run", str(app), "dep", "--stream",
        "--run-config", f"{run_config} resume-from='{folder}'"])
    assert resumed.wait(timeout=400) == 0, procs.log("flwr-run-resumed")[-3000:]
    wait_for(lambda: (folder / "results.json").exists(), 60, "results.json")
    rounds = json.loads((folder / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert rounds[:len(done)] == done  # every completed round kept as it was
    assert f"Resuming {folder} after round {checkpoint['round']}" in procs.log("flwr-run-resumed")
