"""The deployment's front door, checked in the compose files themselves (no Docker engine needed):

* the SuperLink's port, which also serves Flower's unauthenticated Control API, is published on
  the host's loopback only, in compose.yml and in every overlay stack the docs give;
* every SuperLink, SuperNode and SuperExec proves or checks a SuperExec secret, which the
  `secrets` service writes into a volume before they start: one for the SuperLink side, one per
  node, each mounted only where it belongs;
* no SuperNode's ClientApp port (9094) is published, nor on a network that another node's
  services (or the ServerApp's) are on;
* docker/superexec_secret.py and docker/firewall.sh do what those files rely on.

tests/test_docker_stack.py shows the same things on a running stack."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest
from compose_model import DOCKER, NODE_ENV, STACKS, as_mapping, merge, mount_target

SECRET_FLAG = "--superexec-auth-secret-file"

def flower_kind(spec):
    """'superlink', 'supernode' or 'superexec' for a Flower service, None for the others."""
    if "entrypoint" in spec:
        return None
    image = spec["image"]
    if image.startswith("flwr/"):
        return image[len("flwr/"):].split(":")[0]
    return "superexec" if image.startswith("pmafl-superexec:") else None


def networks(spec):
    assert "network_mode" not in spec or spec["network_mode"] == "none", spec["network_mode"]
    return set(as_mapping(spec.get("networks"))) or {"default"}


def nodes(services):
    """Each SuperNode's services: {'supernode-0': {'supernode-0', 'superexec-clientapp-0'}, ...}."""
    groups = {}
    for name, spec in services.items():
        if flower_kind(spec) == "supernode":
            groups[name] = {name}
    for name, spec in services.items():
        if flower_kind(spec) == "superexec":
            host = spec["command"][spec["command"].index("--runtime-api-address") + 1].split(":")[0]
            if host in groups:
                groups[host].add(name)
    return groups


@pytest.mark.parametrize("stack", list(STACKS))
def test_the_superlink_is_published_on_loopback_only(stack):
    services = merge(STACKS[stack], {**NODE_ENV})["services"]
    for name, spec in services.items():
        ports = spec.get("ports", [])
        if flower_kind(spec) == "superlink":
            assert ports, f"{stack}: {name} publishes nothing: `flwr` on the host could not reach it"
            for port in ports:
                host_ip, _, _ = str(port).split(":")
                assert host_ip == "127.0.0.1", f"{stack}: {name} publishes {port}"
        else:
            assert not ports, f"{stack}: {name} publishes {ports}"
    if stack != "remote node":
        raw = (DOCKER / "compose.yml").read_text()
        # Opened only where a user sets SUPERLINK_BIND (docs/deployment.md: with firewall.sh).
        assert '"${SUPERLINK_BIND:-127.0.0.1}:8000:8000"' in raw
        opened = merge(STACKS[stack], {"SUPERLINK_BIND": "10.0.0.5"})["services"]["superlink"]
        assert opened["ports"] == ["10.0.0.5:8000:8000"]
        # After a reboot such a SuperLink must wait for the firewall's rules (firewall.sh).
        assert services["superlink"]["restart"] == "unless-stopped"
        waits = merge(STACKS[stack], {"SUPERLINK_RESTART": "no"})["services"]["superlink"]
        assert waits["restart"] in ("no", False)  # YAML 1.1 reads an unquoted no as false


@pytest.mark.parametrize("stack", list(STACKS))
def test_every_flower_service_uses_its_own_superexec_secret(stack):
    model = merge(STACKS[stack])
    services = model["services"]
    [writer] = [n for n, s in services.items() if s.get("entrypoint") == ["python", "/superexec_secret.py"]]
    written = {}  # volume -> folder the writer fills
    for volume in services[writer]["volumes"]:
        source, target = volume.split(":")[:2]
        if source in model["volumes"]:
            written[source] = target
    assert sorted(written.values()) == sorted(services[writer]["command"])
    assert services[writer]["network_mode"] == "none"

    users = {}  # secret volume -> services that mount it
    for name, spec in services.items():
        kind = flower_kind(spec)
        if kind is None:
            continue
        command = [str(c) for c in spec["command"]]
        assert SECRET_FLAG in command, f"{stack}: {name} runs without {SECRET_FLAG}"
        secret = command[command.index(SECRET_FLAG) + 1]
        [mount] = [v for v in spec["volumes"] if mount_target(v) == str(Path(secret).parent)]
        source = mount.split(":")[0]
        assert source in written and mount.endswith(":ro"), f"{stack}: {name} mounts {mount}"
        assert Path(secret).name == "superexec"  # the file superexec_secret.py writes
        depends = as_mapping(spec.get("depends_on"))
        # Started after the secrets exist (SuperExecs: through the service they depend on).
        chain = [name]
        while writer not in depends:
            [parent] = [d for d in depends if d in services]
            chain.append(parent)
            depends = as_mapping(services[parent].get("depends_on"))
        assert depends[writer] == {"condition": "service_completed_successfully"}, chain
        users.setdefault(source, set()).add(name)

    groups = nodes(services)
    superlinks = {n for n, s in services.items() if flower_kind(s) == "superlink"}
    server_side = superlinks | {n for n, s in services.items() if flower_kind(s) == "superexec"
                                and not any(n in g for g in groups.values())}
    expected = [*groups.values(), server_side] if superlinks else list(groups.values())
    assert sorted(map(sorted, users.values())) == sorted(map(sorted, expected))


@pytest.mark.parametrize("stack", list(STACKS))
def test_no_node_reaches_another_nodes_clientapp_port(stack):
    services = merge(STACKS[stack])["services"]
    groups = nodes(services)
    assert groups and all(len(g) == 2 for g in groups.values()), groups
    nets = {node: set.union(*(networks(services[s]) for s in group)) for node, group in groups.items()}
    for a, b in combinations(groups, 2):
        assert not nets[a] & nets[b], f"{stack}: {a} and {b} share {nets[a] & nets[b]}"
    for node, group in groups.items():
        for name, spec in services.items():
            if name in group or spec.get("network_mode") == "none":
                continue
            if networks(spec) & nets[node]:
                # Only the SuperLink, which the node must reach, is on a node's network.
                assert flower_kind(spec) == "superlink", f"{stack}: {name} is on {node}'s network"


def test_the_compose_cli_merges_the_stacks_the_same_way(tmp_path):
    if shutil.which("docker") is None or subprocess.run(
            ["docker", "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no docker compose on this machine")
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/"), **NODE_ENV}
    for files in STACKS.values():
        args = [a for name in files for a in ("-f", str(DOCKER / name))]
        out = subprocess.run(["docker", "compose", *args, "config", "--format", "json"],
                             capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        services = json.loads(out.stdout)["services"]
        mine = merge(files)["services"]
        assert set(services) == set(mine)
        for name, spec in services.items():
            expected_ports = ["127.0.0.1"] * len(mine[name].get("ports", []))
            assert [p["host_ip"] for p in spec.get("ports", [])] == expected_ports, name
            assert spec.get("command") == [str(c) for c in mine[name]["command"]], name
            expected_networks = set() if "network_mode" in spec else networks(mine[name])
            assert set(spec.get("networks", {})) == expected_networks, name


def test_superexec_secret_is_written_once_private_and_whole(tmp_path):
    sys.path.insert(0, str(DOCKER))
    from superexec_secret import ensure_secret

    assert ensure_secret(tmp_path) is True
    secret = tmp_path / "superexec"
    first = secret.read_bytes()
    assert re.fullmatch(rb"[0-9a-f]{64}", first)  # Flower reads the raw bytes: no newline
    assert stat.S_IMODE(secret.stat().st_mode) == 0o400
    if os.geteuid() == 0:
        assert secret.stat().st_uid == 49999  # Flower's user `app`
    assert ensure_secret(tmp_path) is False and secret.read_bytes() == first
    assert [p.name for p in tmp_path.iterdir()] == ["superexec"]


@pytest.fixture
def fake_iptables(tmp_path):
    """iptables / iptables-restore stand-ins that keep the rules in a file, so that firewall.sh
    runs without root or a kernel firewall: -C succeeds when the rule is there."""
    rules = tmp_path / "rules"
    rules.write_text("-N DOCKER-USER\n-A DOCKER-USER -j RETURN\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "iptables").write_text(f"""#!{sys.executable}
import sys
from pathlib import Path
rules = Path({str(rules)!r})
lines = rules.read_text().splitlines()
args = [a for a in sys.argv[1:] if a != "-w"]
op, chain, rest = args[0], (args[1] if len(args) > 1 else ""), " ".join(args[2:])
if op == "-S":
    mine = [l for l in lines if l.split()[1] == chain]
    print("\\n".join(mine)) if mine else sys.exit(1)
elif op in ("-n", "-L"):
    chain = args[args.index("-L") + 1]
    sys.exit(0 if f"-N {{chain}}" in lines else 1)
elif op == "-C":
    sys.exit(0 if f"-A {{chain}} {{rest}}" in lines else 1)
elif op == "-D":
    lines.remove(f"-A {{chain}} {{rest}}")
elif op == "-F":
    lines = [l for l in lines if not l.startswith(f"-A {{chain}} ")]
elif op == "-X":
    lines.remove(f"-N {{chain}}")
rules.write_text("".join(l + "\\n" for l in lines))
""")
    (bin_dir / "iptables-restore").write_text(f"""#!{sys.executable}
import sys
from pathlib import Path
rules = Path({str(rules)!r})
lines = rules.read_text().splitlines()
assert "--noflush" in sys.argv
for line in sys.stdin.read().splitlines():
    if line.startswith(":"):
        chain = line[1:].split()[0]
        lines = [l for l in lines if not l.startswith(f"-A {{chain}} ")]
        if f"-N {{chain}}" not in lines:
            lines.append(f"-N {{chain}}")
    elif line.startswith("-A "):
        lines.append(line)
    elif line.startswith("-I "):
        _, chain, position, rule = line.split(" ", 3)
        at = [i for i, l in enumerate(lines) if l.startswith(f"-A {{chain}} ")][int(position) - 1]
        lines.insert(at, f"-A {{chain}} {{rule}}")
rules.write_text("".join(l + "\\n" for l in lines))
""")
    (bin_dir / "id").write_text("#!/bin/sh\necho 0\n")  # firewall.sh insists on root
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

    def firewall(*args):
        return subprocess.run(["bash", str(DOCKER / "firewall.sh"), *args], env=env,
                              capture_output=True, text=True, timeout=60)
    return firewall, rules


def test_firewall_allows_only_the_listed_sources_and_is_idempotent(fake_iptables):
    firewall, rules = fake_iptables
    chain = "PMAFL-SUPERLINK-8000"
    jump = ("-A DOCKER-USER -p tcp -m conntrack --ctstate DNAT --ctdir ORIGINAL "
            f"--ctorigdstport 8000 -j {chain}")
    expected = ["-N DOCKER-USER", jump, "-A DOCKER-USER -j RETURN", f"-N {chain}",
                f"-A {chain} -s 203.0.113.7 -j RETURN", f"-A {chain} -s 198.51.100.0/24 -j RETURN",
                f"-A {chain} -p tcp -j REJECT --reject-with tcp-reset"]
    for _ in range(2):  # twice: the same rules, one jump
        out = firewall("allow", "203.0.113.7", "198.51.100.0/24")
        assert out.returncode == 0, out.stderr
        assert rules.read_text().splitlines() == expected
    out = firewall("allow", "203.0.113.8")  # a new list replaces the old
    assert rules.read_text().splitlines() == [*expected[:4], f"-A {chain} -s 203.0.113.8 -j RETURN",
                                              expected[-1]]
    assert "PMAFL-SUPERLINK-8000" in firewall("show").stdout
    other = firewall("allow", "--port", "18000", "203.0.113.9")  # another port, its own chain
    assert other.returncode == 0 and "-N PMAFL-SUPERLINK-18000" in rules.read_text()
    for _ in range(2):
        assert firewall("remove").returncode == 0
        assert chain not in rules.read_text() and "PMAFL-SUPERLINK-18000" in rules.read_text()
    assert firewall("remove", "--port", "18000").returncode == 0
    assert rules.read_text().splitlines() == ["-N DOCKER-USER", "-A DOCKER-USER -j RETURN"]
    assert firewall("allow").returncode == 2  # nothing to allow: usage, no change
    assert firewall("allow", "--port", "http", "10.0.0.1").returncode == 2
