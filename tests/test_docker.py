"""The compose files, checked without a Docker engine: every service's command is parsed by the
installed Flower's own argument parser (the image's version), addresses and ports line up, node
partitions cover 0..N-1, mounted credentials are the files the credentials script makes, and the
TLS / authentication overlays leave no insecure link to the SuperLink. With a `docker` CLI at hand,
`docker compose config` checks them too."""

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from compose_model import DOCKER, STACKS, merge
from flwr.supercore.cli.flower_superexec import _parse_args as _parse_args_superexec
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

FLWR_VERSION = importlib.metadata.version("flwr")
PARSERS = {"superlink": _parse_args_run_superlink, "supernode": _parse_args_run_supernode,
           "superexec": _parse_args_superexec}


def kind(spec):
    image = spec["image"]
    if image.startswith("flwr/"):
        name, version = image[len("flwr/"):].split(":")
        assert version == FLWR_VERSION, f"{image}: the app pins flwr {FLWR_VERSION}"
        return name
    assert image.startswith("pmafl-superexec:"), f"{image}: not an image of docker/Dockerfile"
    return "superexec"


@pytest.fixture(scope="module")
def credential_files(tmp_path_factory):
    sys.path.insert(0, str(DOCKER))
    from make_credentials import make_credentials

    out = tmp_path_factory.mktemp("credentials")
    make_credentials(out, nodes=4, hosts=["superlink.example.org"])
    return {p.name for p in out.iterdir()}


@pytest.mark.parametrize("stack", list(STACKS))
def test_compose_stack_is_consistent(stack, credential_files):
    model = merge(STACKS[stack])
    # The one-shot `secrets` service (docker/superexec_secret.py) runs no Flower component:
    # tests/test_compose_files.py checks it and the secrets it writes.
    services = {n: s for n, s in model["services"].items() if "entrypoint" not in s}
    args = {}
    for name, spec in services.items():
        command = [str(c) for c in spec["command"]]
        try:
            args[name] = (kind(spec), PARSERS[kind(spec)]().parse_args(command))
        except SystemExit:
            pytest.fail(f"{stack}: service {name}: flower-{kind(spec)} {FLWR_VERSION} rejects {command}")
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./credentials/"):
                assert Path(source).name in credential_files, f"{name}: {source} is never made"
            else:
                assert source in model.get("volumes", {}), f"{name}: volume {source} not declared"
        for dependency in spec.get("depends_on", []):
            assert dependency in model["services"]
    # Each app image is built by exactly one service (not once per service that runs it).
    builders = {}
    for name, spec in services.items():
        if "build" in spec:
            assert spec["build"]["dockerfile"] == "docker/Dockerfile"
            builders.setdefault(spec["image"], []).append(name)
    assert all(len(names) == 1 for names in builders.values()), builders
    assert {s["image"] for s in services.values() if s["image"].startswith("pmafl-")} == set(builders)

    superlinks = [a for k, a in args.values() if k == "superlink"]
    supernodes = {n: a for n, (k, a) in args.items() if k == "supernode"}
    if superlinks:
        [link] = superlinks
        assert link.isolation == "process" and link.host == "0.0.0.0"
    partitions = []
    for node in supernodes.values():
        assert node.isolation == "process" and node.host == "0.0.0.0"
        if superlinks:
            assert node.superlink == f"superlink:{link.port}"
        config = dict(item.split("=") for item in node.node_config.split())
        partitions.append((int(config["partition-id"]), int(config["num-partitions"])))
    for name, (k, execs) in args.items():
        if k != "superexec":
            continue
        host, port = execs.runtime_api_address.split(":")
        target = args[host][1]  # a SuperLink (ServerApp) or a SuperNode (ClientApp) service
        assert int(port) == target.port, f"{name} talks to {host}:{port}, which serves {target.port}"
        assert host in services[name].get("depends_on", [])
    if stack != "remote node":
        assert sorted(p for p, _ in partitions) == list(range(len(partitions)))
        assert {n for _, n in partitions} == {len(partitions)}
        assert len([a for k, a in args.values() if k == "superexec"]) == len(supernodes) + 1

    if "tls" in stack or stack == "remote node":
        if superlinks:
            assert not link.insecure and link.ssl_certfile and link.ssl_keyfile
        for node in supernodes.values():
            assert not node.insecure and node.root_certificates == "/certs/ca.crt"
        server_exec = [a for n, (k, a) in args.items() if k == "superexec"
                       and a.runtime_api_address.startswith("superlink:")]
        assert all(not a.insecure and a.root_certificates for a in server_exec)
    if "auth" in stack or stack == "remote node":
        assert not superlinks or link.enable_supernode_auth
        for node in supernodes.values():
            assert node.auth_supernode_private_key.startswith("/keys/")
    if "state" in stack:
        # On /app, which the image's user owns: a fresh volume elsewhere would belong to root.
        assert link.database == "/app/state.db" and "superlink-state:/app" in services["superlink"]["volumes"]
    if stack == "gpu":
        for name, spec in services.items():
            if name.startswith("superexec-clientapp"):
                [device] = spec["deploy"]["resources"]["reservations"]["devices"]
                assert device["capabilities"] == ["gpu"] and spec["image"] == "pmafl-superexec:cuda"
        assert "cu" in services["superexec-clientapp-0"]["build"]["args"]["TORCH_INDEX"]


def test_dockerfile_builds_on_the_pinned_superexec_image_and_copies_what_exists():
    text = (DOCKER / "Dockerfile").read_text()
    assert f"ARG FLWR_VERSION={FLWR_VERSION}" in text and "FROM flwr/superexec:${FLWR_VERSION}" in text
    root = DOCKER.parent
    for source in re.findall(r"^COPY (?!.*--from=)(?:--\S+ )*(.+) \S+$", text, flags=re.M):
        for path in source.split():
            assert (root / path).exists(), f"Dockerfile copies {path}, which does not exist"


def has_compose():
    return shutil.which("docker") is not None and subprocess.run(
        ["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not has_compose(), reason="no docker compose on this machine")
@pytest.mark.parametrize("stack", list(STACKS))
def test_docker_compose_config_accepts_the_stack(stack, tmp_path):
    files = [arg for name in STACKS[stack] for arg in ("-f", str(DOCKER / name))]
    env = {"SUPERLINK": "x:8000", "PARTITION_ID": "0", "NUM_PARTITIONS": "1", "NODE_KEY": "supernode-0",
           "PATH": os.environ["PATH"]}
    out = subprocess.run(["docker", "compose", *files, "config", "-q"], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stderr
