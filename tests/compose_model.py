"""The compose model of docker/'s stacks, as `docker compose -f A -f B ... config` would merge
them, read without a Docker engine: shared by tests/test_compose_files.py and tests/test_docker.py."""

import re
from pathlib import Path

import yaml

DOCKER = Path(__file__).resolve().parents[1] / "docker"
STACKS = {
    "base": ["compose.yml"],
    "tls": ["compose.yml", "compose.tls.yml"],
    "tls+auth": ["compose.yml", "compose.tls.yml", "compose.auth.yml"],
    "tls+auth+state": ["compose.yml", "compose.tls.yml", "compose.auth.yml", "compose.state.yml"],
    "gpu": ["compose.yml", "compose.gpu.yml"],
    "tls+auth+state+gpu": ["compose.yml", "compose.tls.yml", "compose.auth.yml", "compose.state.yml",
                           "compose.gpu.yml"],
    "remote node": ["compose.node.yml"],
}
NODE_ENV = {"SUPERLINK": "superlink.example.org:8000", "PARTITION_ID": "3", "NUM_PARTITIONS": "10",
            "NODE_KEY": "supernode-3"}


def interpolate(text: str, env: dict) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}`, with `env` as the environment."""
    def value(match):
        name, op, arg = match.group(1), match.group(2) or "", match.group(3) or ""
        if env.get(name):
            return env[name]
        if op == ":-":
            return arg
        assert op != ":?", f"${{{name}}} is required"
        return ""
    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", value, text)


def mount_target(volume: str) -> str:
    return volume.split(":")[1]


def merge(files, env=None):
    """`docker compose -f A -f B ...` for the keys these files use: a service's `command` and
    `entrypoint` are replaced, volumes merge by mount target, ports add up, networks and
    depends_on merge; top-level mappings merge."""
    model = {}
    for name in files:
        doc = yaml.safe_load(interpolate((DOCKER / name).read_text(), env or NODE_ENV))
        for key, value in doc.items():
            if key.startswith("x-"):
                continue
            if key != "services":
                model[key] = {**model.get(key, {}), **(value or {})} if isinstance(value, dict) else value
                continue
            services = model.setdefault("services", {})
            for service, spec in value.items():
                merged = dict(services.get(service, {}))
                for field, item in spec.items():
                    if field == "volumes":
                        mounts = {mount_target(v): v for v in merged.get("volumes", [])}
                        mounts.update({mount_target(v): v for v in item})
                        merged["volumes"] = list(mounts.values())
                    elif field == "ports":
                        merged["ports"] = merged.get("ports", []) + item
                    elif field in ("networks", "depends_on"):
                        merged[field] = {**as_mapping(merged.get(field)), **as_mapping(item)}
                    else:
                        merged[field] = item
                services[service] = merged
    return model


def as_mapping(value):
    return dict.fromkeys(value, None) if isinstance(value, list) else dict(value or {})
