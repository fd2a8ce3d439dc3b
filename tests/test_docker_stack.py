"""The docker compose deployment built and run for real: the stand-ins of Flower's images and the
project's image are built, `docker compose up --build` brings up docker/compose.yml with the TLS,
node-authentication and state overlays (each node on a network of its own with the SuperLink),
and a PM-AFL federation runs through faults between them. First, the front door:

* the SuperLink's port is published on loopback and, for this test, on the address of a network
  namespace that stands in for other machines, behind docker/firewall.sh: an allowed source
  address connects, another one is refused, and connects again once the rules are removed;
* a SuperExec with a wrong secret, or none, is refused by a SuperNode, and one with a node's
  secret by the SuperLink: each exits without starting an app, and the SuperNode or SuperLink
  logs the failed authentication (the stack's own SuperExecs never fail it);
* one node's containers cannot connect to another node's ClientApp port (9094), while its own
  SuperExec can;
* an unregistered SuperNode is refused.

Then the faults:

* one SuperNode's network is cut (`docker network disconnect`) for longer than a round, then
  restored: the round goes on without it and it takes part again afterwards;
* another SuperNode reaches the SuperLink with 500 ms latency each way and loses 5% of its
  packets. The loss is iptables' `statistic` match in the node's network namespace. The latency
  is a TCP relay (tests/delay_proxy.py) in front of the SuperLink on that node's own network,
  because the kernels this project is developed on have no netem qdisc; bytes pass through, so
  TLS still ends at the SuperLink;
* a ClientApp SuperExec is killed and restarted;
* the SuperLink container is restarted mid-run: with the state overlay it keeps its registered
  nodes and the run, which finishes (`flwr run --stream` loses its stream; `flwr log` reattaches).

Marked `docker`: the default test run deselects it (about 12 minutes once the images are
built, 20 before). Run it with `python -m pytest -m docker` or `docker/selftest.sh` (which also
installs the engine and Compose). It needs root (nsenter, iptables, ip netns, the key files'
owner) and a running Docker engine; it skips with the reason otherwise. The compose project is
`pmafl-selftest`, so a stack of your own is left alone; the test removes its containers, volumes,
networks, firewall rules and network namespace at the end."""

import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from loopback import free_ports
from test_deployment import make_teacher, wait_for
from test_simulation import BIN, ROOT

sys.path.insert(0, str(ROOT / "docker"))
from make_credentials import make_credentials  # noqa: E402

pytestmark = pytest.mark.docker

PROJECT = "pmafl-selftest"
FILES = ["compose.yml", "compose.tls.yml", "compose.auth.yml", "compose.state.yml"]
APP_UID = 49999  # user `app` in Flower's images
NODES = 3
OUTSIDE = "pmafl-selftest-out"  # the network namespace of the machines outside the stack
AUTH_FAILED = "SuperExec authentication failed"
# Prints how a TCP connection to HOST PORT [from SOURCE] went: `connected` or the error's name.
PROBE = """import socket, sys
host, port, *source = sys.argv[1:]
try:
    socket.create_connection((host, int(port)), timeout=5,
                             source_address=(source[0], 0) if source else None).close()
    print("connected")
except OSError as err:
    print(type(err).__name__)
"""


def unavailable() -> str:
    """Why this machine cannot run the stack, or '' when it can."""
    if os.geteuid() != 0:
        return "needs root (nsenter and iptables in a container's network namespace)"
    if shutil.which("docker") is None:
        return "no docker CLI: run docker/selftest.sh, which installs the engine and Compose"
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "the Docker engine is not running (docker/selftest.sh starts it)"
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        return "no Compose v2 plugin (`docker compose`): docker/selftest.sh installs one"
    for tool in ("nsenter", "iptables", "ip"):
        if shutil.which(tool) is None:
            return f"no {tool} on this machine"
    return ""


def run(*command, timeout=600, check=True, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout,
                         **kwargs)
    if check and out.returncode != 0:
        pytest.fail(f"{' '.join(map(str, command))} exited with {out.returncode}:\n"
                    f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def outside_subnet() -> ipaddress.IPv4Network:
    """A /24 for the outside namespace that overlaps no address or route of this host (the
    machines this is developed on have TEST-NET-1 on their own interface)."""
    used = run("ip", "-4", "addr").stdout + run("ip", "-4", "route", "show", "table", "all").stdout
    taken = [ipaddress.ip_network(m, strict=False) for m in re.findall(r"\d+\.\d+\.\d+\.\d+(?:/\d+)?", used)]
    for candidate in ("198.51.100.0/24", "203.0.113.0/24", "10.213.57.0/24", "172.31.213.0/24"):
        subnet = ipaddress.ip_network(candidate)
        if not any(subnet.overlaps(net) for net in taken):
            return subnet
    pytest.fail("no free /24 for the outside network namespace")


class Outside:
    """A network namespace joined to the host by a veth pair: to the host's firewall, traffic
    from it comes from another machine. The host's end has .1, where the test publishes the
    SuperLink's port; the namespace has .2 and .130 (on the allow list) and .3 (not on it)."""

    def __init__(self) -> None:
        subnet = outside_subnet()
        self.host, self.allowed, self.in_cidr, self.denied = (str(subnet[i]) for i in (1, 2, 130, 3))
        self.allow_list = [self.allowed, f"{subnet[128]}/25"]

    def up(self) -> None:
        self.down()
        run("ip", "netns", "add", OUTSIDE)
        run("ip", "link", "add", "pmafl-out-h", "type", "veth", "peer", "name", "pmafl-out-n")
        run("ip", "link", "set", "pmafl-out-n", "netns", OUTSIDE)
        run("ip", "addr", "add", f"{self.host}/24", "dev", "pmafl-out-h")
        run("ip", "link", "set", "pmafl-out-h", "up")
        for address in (self.allowed, self.denied, self.in_cidr):
            run("ip", "-n", OUTSIDE, "addr", "add", f"{address}/24", "dev", "pmafl-out-n")
        run("ip", "-n", OUTSIDE, "link", "set", "pmafl-out-n", "up")

    def connect(self, source: str, port: int) -> str:
        return run("ip", "netns", "exec", OUTSIDE, sys.executable, "-c", PROBE, self.host, port,
                   source, timeout=60).stdout.strip()

    @staticmethod
    def down() -> None:
        run("ip", "link", "del", "pmafl-out-h", check=False)
        run("ip", "netns", "del", OUTSIDE, check=False)


def firewall(*args, **kwargs):
    return run(ROOT / "docker" / "firewall.sh", *args, **kwargs)


def overlay(creds: Path, port: int, outside: Outside) -> str:
    """The test's own overlay: its credentials, a free host port (also published on the outside
    namespace's side of the host), and the delay relay with the slow node's network. Volumes merge
    by mount target, so these mounts replace the overlays'; `!override` replaces a list."""
    def mounts(*pairs):
        return "[" + ", ".join(f'"{creds / a}:{b}:ro"' for a, b in pairs) + "]"

    lines = ["services:", "  superlink:",
             f'    ports: !override ["127.0.0.1:{port}:8000", "{outside.host}:{port}:8000"]',
             "    volumes: " + mounts(("ca.crt", "/certs/ca.crt"), ("server.pem", "/certs/server.pem"),
                                      ("server.key", "/certs/server.key")),
             "  superexec-serverapp:", "    volumes: " + mounts(("ca.crt", "/certs/ca.crt"))]
    for i in range(NODES):
        key = (f"supernode-{i}", f"/keys/supernode-{i}")
        lines += [f"  supernode-{i}:", "    volumes: " + mounts(("ca.crt", "/certs/ca.crt"), key)]
        if i == 2:  # the slow node: on a network where `superlink` is the delay relay
            lines += ["    networks: !override [slow]", "  superexec-clientapp-2:",
                      "    networks: !override [slow]"]
    lines += ["  delay-relay:", "    image: pmafl-superexec:cpu",
              '    entrypoint: ["python", "/relay/delay_proxy.py", "8000",'
              f' "{PROJECT}-superlink-1:8000", "0.5"]',
              f'    volumes: ["{ROOT / "tests" / "delay_proxy.py"}:/relay/delay_proxy.py:ro"]',
              "    depends_on: [superlink]", "    restart: unless-stopped",
              "    networks:", "      default: {}", "      slow:", "        aliases: [superlink]",
              "networks:", "  slow: {}"]
    return "\n".join(lines) + "\n"


class Stack:
    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.port = port
        self.files = [a for name in FILES for a in ("-f", ROOT / "docker" / name)]
        self.files += ["-f", folder / "selftest.yml"]
        self.home = folder / "flwr-home"
        self.env = {**os.environ, "FLWR_HOME": str(self.home)}

    def compose(self, *args, **kwargs):
        return run("docker", "compose", "-p", PROJECT, *self.files, *args, **kwargs)

    def container(self, service: str) -> str:
        return f"{PROJECT}-{service}-1"

    def logs(self, service: str) -> str:
        out = run("docker", "logs", self.container(service), check=False)
        return out.stdout + out.stderr

    def flwr(self, *args, **kwargs):
        return run(BIN / "flwr", *args, env=self.env, **kwargs)

    def netns(self, service: str, *command, **kwargs):
        pid = run("docker", "inspect", "-f", "{{.State.Pid}}", self.container(service)).stdout.strip()
        return run("nsenter", "-t", pid, "-n", *command, **kwargs)

    def connect(self, service: str, host: str, port: int) -> str:
        """How a TCP connection from `service`'s network namespace to HOST:PORT went."""
        return self.netns(service, sys.executable, "-c", PROBE, host, port, timeout=60).stdout.strip()

    def address(self, service: str, network: str) -> str:
        template = f'{{{{(index .NetworkSettings.Networks "{PROJECT}_{network}").IPAddress}}}}'
        return run("docker", "inspect", "-f", template, self.container(service)).stdout.strip()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("docker-stack")
    run(ROOT / "docker" / "standins" / "build.sh", timeout=1200)
    outside = Outside()
    creds = folder / "credentials"
    make_credentials(creds, nodes=NODES + 1, hosts=[])
    # The containers run as `app`: the private keys they read must be that user's (as Flower's
    # docs say: chown 49999:49999).
    for key in ["server.key", *(f"supernode-{i}" for i in range(NODES + 1))]:
        os.chown(creds / key, APP_UID, APP_UID)
    [port] = free_ports(1)
    (folder / "selftest.yml").write_text(overlay(creds, port, outside))
    stack = Stack(folder, port)
    stack.outside = outside
    stack.home.mkdir()
    (stack.home / "config.toml").write_text(
        f'[superlink]\ndefault = "selftest"\n\n[superlink.selftest]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{creds / "ca.crt"}"\n')
    stack.creds = creds
    try:
        outside.up()
        # The port is limited before anything listens on it, as docs/deployment.md says.
        for _ in range(2):  # and `allow` again leaves the same rules
            firewall("allow", "--port", port, *outside.allow_list)
        yield stack
    finally:
        for service in ("superlink", "superexec-serverapp", *(f"supernode-{i}" for i in range(NODES))):
            (folder / f"{service}.log").write_text(stack.logs(service))
        stack.compose("down", "-v", "--remove-orphans", check=False, timeout=300)
        firewall("remove", "--port", port, check=False)
        Outside.down()


def check_firewall(stack: Stack) -> None:
    """Only the allowed sources of the outside namespace reach the SuperLink's published port."""
    rules = run("iptables", "-S", "DOCKER-USER").stdout
    assert rules.count(f"-j PMAFL-SUPERLINK-{stack.port}") == 1, rules  # `allow` twice: one jump
    outside = stack.outside
    wait_for(lambda: outside.connect(outside.allowed, stack.port) == "connected", 60,
             "the allowed address to connect")
    assert outside.connect(outside.in_cidr, stack.port) == "connected"  # in the allowed /25
    assert outside.connect(outside.denied, stack.port) == "ConnectionRefusedError"


def check_nodes_are_apart(stack: Stack) -> None:
    """Node 0's ClientApp port answers its own SuperExec, and not node 1 nor the ServerApp's side."""
    node0 = stack.address("supernode-0", "node-0")
    assert stack.connect("superexec-clientapp-0", node0, 9094) == "connected"
    for service in ("supernode-1", "superexec-clientapp-1", "superexec-serverapp"):
        outcome = stack.connect(service, node0, 9094)
        assert outcome != "connected", f"{service} reached node 0's ClientApp port"


def check_superexec_secrets(stack: Stack, tmp_path: Path) -> None:
    """SuperExecs without the right secret get no task: each exits at once, having started no
    app, and the SuperNode or SuperLink it asked logs the failed authentication."""
    wrong = tmp_path / "wrong-secret"
    wrong.write_text(secrets.token_hex(32))
    wrong.chmod(0o644)
    node0 = ["--insecure", "--runtime-api-address", "supernode-0:9094"]
    attempts = [  # (network, mounts, arguments, the service that must refuse it)
        ("node-0", [f"{wrong}:/secrets/superexec:ro"],
         [*node0, "--superexec-auth-secret-file", "/secrets/superexec"], "supernode-0"),
        ("node-0", [], node0, "supernode-0"),
        # Node 0's own secret is not the SuperLink's: a ClientApp container cannot take ServerApps.
        ("default", [f"{PROJECT}_node-0-secret:/secrets:ro", f"{stack.creds / 'ca.crt'}:/certs/ca.crt:ro"],
         ["--root-certificates", "/certs/ca.crt", "--runtime-api-address", "superlink:8000",
          "--superexec-auth-secret-file", "/secrets/superexec"], "superlink"),
    ]
    for service in ("superlink", "supernode-0"):  # the stack's own SuperExecs authenticate
        assert AUTH_FAILED not in stack.logs(service), f"{service} refused one of the stack's SuperExecs"
    for network, volumes, args, refuser in attempts:
        before = stack.logs(refuser).count(AUTH_FAILED)
        # Exits by itself (run() fails on a timeout): a refused SuperExec stops asking.
        out = run("docker", "run", "--rm", "--network", f"{PROJECT}_{network}",
                  *(a for v in volumes for a in ("-v", v)), "pmafl-superexec:cpu", *args, timeout=120)
        assert "Start `flwr-" not in out.stdout + out.stderr, out.stdout + out.stderr
        wait_for(lambda refuser=refuser, before=before: stack.logs(refuser).count(AUTH_FAILED) > before,
                 30, f"{refuser} to log the refused SuperExec")


def test_compose_deployment_with_tls_and_auth_survives_faults(stack, tmp_path):
    # Up: the SuperLink and the ServerApp's SuperExec first (building the app image), then the
    # nodes are registered, then everything, exactly as docs/deployment.md says.
    stack.compose("up", "--build", "-d", "superlink", "superexec-serverapp", timeout=1800)
    wait_for(lambda: "Uvicorn running on https://" in stack.logs("superlink"), 120, "the TLS SuperLink")
    node_ids = []
    for i in range(NODES):
        out = stack.flwr("supernode", "register", stack.creds / f"supernode-{i}.pub", "selftest")
        node_ids.append(int(re.search(r"SuperNode (\d+) registered", out.stdout).group(1)))
    stack.compose("up", "--build", "-d", timeout=900)

    # An unregistered key is refused.
    refused = run("docker", "run", "--rm", "--network", f"{PROJECT}_default",
                  "-v", f"{stack.creds / 'ca.crt'}:/certs/ca.crt:ro",
                  "-v", f"{stack.creds / f'supernode-{NODES}'}:/keys/node:ro",
                  f"flwr/supernode:{flwr_version()}", "--root-certificates", "/certs/ca.crt",
                  "--superlink", "superlink:8000", "--auth-supernode-private-key", "/keys/node",
                  "--max-retries", "1", check=False, timeout=300)
    assert refused.returncode != 0
    assert "Failed to activate SuperNode" in refused.stdout + refused.stderr
    # The front door: the SuperLink's port, the SuperExec secrets, the nodes' ClientApp ports.
    check_firewall(stack)
    check_superexec_secrets(stack, tmp_path)
    check_nodes_are_apart(stack)

    # Every node (and the server) gets the same teacher, seeded as docs/deployment.md says.
    teacher = tmp_path / "teacher" / "digits--cnn-large.pt"
    make_teacher(teacher, seed=0)
    sha256 = None
    for service in ["superexec-serverapp", *(f"superexec-clientapp-{i}" for i in range(NODES))]:
        stack.compose("cp", teacher, f"{service}:/tmp/T.pt")
        stack.compose("cp", teacher.with_suffix(".json"), f"{service}:/tmp/T.json")
        out = stack.compose("exec", "-T", service, "pmafl-teacher", "import", "/tmp/T.pt",
                            "--cache-dir", "/data/cache/pmafl/teachers")
        sha256 = re.search(r"sha256 ([0-9a-f]{64})", out.stdout).group(1)
    # 5% packet loss both ways on node 2 (its latency comes from the relay it reaches the SuperLink by).
    for chain in ("INPUT", "OUTPUT"):
        stack.netns("supernode-2", "iptables", "-A", chain, "-m", "statistic", "--mode", "random",
                    "--probability", "0.05", "-j", "DROP")

    rounds = 5
    run_config = (f"num-server-rounds={rounds} local-epochs=1 pgd-steps=2 eval-steps=3 "
                  f"federated-eval-every=1 min-train-nodes=1 min-available-nodes={NODES} "
                  f"round-timeout=150 teacher-sha256='{sha256}' results-dir='/data/results'")
    log_path = tmp_path / "flwr-run.log"
    with log_path.open("w") as log:
        flwr_run = subprocess.Popen([BIN / "flwr", "run", ROOT, "selftest", "--stream",
                                     "--run-config", run_config], env=stack.env, stdout=log,
                                    stderr=subprocess.STDOUT)
    started = re.compile(r"Successfully started run (\d+)")
    wait_for(lambda: started.search(log_path.read_text()), 300, "the run to start")
    run_id = started.search(log_path.read_text()).group(1)

    def reached(n: int) -> bool:  # the ServerApp's log, as `flwr run --stream` shows it
        return f"[ROUND {n}/{rounds}]" in log_path.read_text()

    # Round 2: node 1 loses its network for longer than the round.
    wait_for(lambda: reached(2), 900, "round 2")
    net = f"{PROJECT}_node-1"  # its link to the SuperLink and to its own SuperExec
    run("docker", "network", "disconnect", net, stack.container("supernode-1"))
    # Restored once round 2's training ended without it (round-timeout: longer than a round).
    # Not later: with min-available-nodes=3, round 3 waits for it.
    wait_for(lambda: "round 2 train:" in log_path.read_text(), 900, "round 2's training without node 1")
    # `docker network connect` alone would drop the service name, and node 1's SuperExec, which
    # reaches its SuperNode as `supernode-1`, could not find it again: give it back.
    run("docker", "network", "connect", "--alias", "supernode-1", net, stack.container("supernode-1"))
    # Round 3: node 0's ClientApp SuperExec is killed once node 0 has its train message, then
    # started again.
    wait_for(lambda: stack.logs("supernode-0").count("Receiving: train message") >= 3, 600,
             "node 0's round-3 train message")
    # Rounds 1 and 2 each started a train and an evaluate ClientApp: a fifth start is round 3's.
    started = stack.logs("superexec-clientapp-0").count("Start `flwr-clientapp` process") >= 5
    run("docker", "kill", stack.container("superexec-clientapp-0"))
    time.sleep(5)
    run("docker", "start", stack.container("superexec-clientapp-0"))
    # Round 4: the SuperLink restarts; its state (nodes, the run) is on the volume.
    wait_for(lambda: reached(4), 900, "round 4")
    run("docker", "restart", stack.container("superlink"))
    assert flwr_run.wait(timeout=900) is not None  # the stream ends with the SuperLink's restart
    # The log still holds the first start's lines: wait until the CLI connects again.
    wait_for(lambda: stack.flwr("supernode", "list", "selftest", check=False, timeout=60).returncode == 0,
             180, "the SuperLink back")
    listed = stack.flwr("supernode", "list", "selftest", timeout=120).stdout
    assert all(str(node) in listed for node in node_ids), listed
    follow = stack.flwr("log", run_id, "selftest", "--stream", timeout=1800)
    assert "Results written to" in follow.stdout, follow.stdout[-3000:]

    # The results on the ServerApp's volume: every round, and the model.
    out_dir = tmp_path / "results"
    stack.compose("cp", "superexec-serverapp:/data/results", out_dir)
    [results] = list(out_dir.glob("*/results.json"))
    assert (results.parent / "model.pt").is_file()
    state = torch.load(results.parent / "model.pt", weights_only=True)
    assert state, "empty model file"
    by_round = {row["round"]: row for row in json.loads(results.read_text())["rounds"]}
    assert sorted(by_round) == list(range(rounds + 1))  # round 0 is the initial model

    def left_out(row):
        return {f["node"] for f in row["failures"] if f["stage"] == "train"}

    assert node_ids[1] in left_out(by_round[2]), by_round[2]["failures"]
    assert node_ids[1] not in left_out(by_round[3]), by_round[3]["failures"]  # its link is back
    if not started:
        # Killed before it started round 3's ClientApp: the SuperNode still holds the message and
        # hands it to the restarted SuperExec, so node 0 takes part in round 3 after all.
        assert node_ids[0] not in left_out(by_round[3]), by_round[3]["failures"]
    print(f"node 0's SuperExec killed {'after' if started else 'before'} it started round 3's "
          f"ClientApp; round 3 left out: {sorted(left_out(by_round[3]))}")
    # Back for the last round: all three nodes' replies aggregated, the slow one included.
    assert left_out(by_round[rounds]) == set(), by_round[rounds]["failures"]
    assert by_round[rounds]["fed_num_clients"] == NODES
    # TLS and authentication were in use.
    assert "--ssl-certfile" in run("docker", "inspect", stack.container("superlink")).stdout
    assert "Uvicorn running on https://" in stack.logs("superlink")
    for i in range(NODES):
        assert "SuperNode ID" in stack.logs(f"supernode-{i}")
    # The stack's own SuperExecs authenticated all along (node 0's refusals are the test's).
    assert AUTH_FAILED not in stack.logs("supernode-1") + stack.logs("supernode-2")
    # With the rules removed, the refused address connects: it was the firewall that refused it.
    firewall("remove", "--port", stack.port)
    assert f"PMAFL-SUPERLINK-{stack.port}" not in run("iptables", "-S").stdout
    assert stack.outside.connect(stack.outside.denied, stack.port) == "connected"


def flwr_version() -> str:
    import importlib.metadata
    return importlib.metadata.version("flwr")
