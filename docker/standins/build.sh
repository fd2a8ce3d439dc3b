#!/usr/bin/env bash
# Build local stand-ins for flwr/superlink, flwr/supernode and flwr/superexec (FLWR_VERSION,
# default 1.41.0) where no image registry answers: a Debian bookworm root file system made with
# debootstrap (as root), imported as a base image, then docker/standins/Dockerfile on it. Images
# that already exist are kept; pass --force to rebuild them.
set -euo pipefail
cd "$(dirname "$0")"
version=${FLWR_VERSION:-1.41.0}
base=pmafl-standin/debian-bookworm:minbase
force=${1:-}

have() { docker image inspect "$1" >/dev/null 2>&1; }

if [ "$force" = --force ] || ! have "$base"; then
  command -v debootstrap >/dev/null || { echo "debootstrap is needed: apt-get install debootstrap" >&2; exit 1; }
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  echo "debootstrap: a bookworm root file system with python3 (about a minute)..."
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
    "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/dev/null
  tar -C "$rootfs" -c . | docker import - "$base" >/dev/null
fi

context=$(mktemp -d)
# The host's CA bundle, for a package index behind a TLS-intercepting proxy (as the host's pip sees it).
cert=${PIP_CERT:-$(python3 -m pip config get global.cert 2>/dev/null || true)}
[ -n "$cert" ] && [ -f "$cert" ] && cp "$cert" "$context/ca.crt"
for component in superlink supernode superexec; do
  if [ "$force" = --force ] || ! have "flwr/$component:$version"; then
    echo "building the stand-in flwr/$component:$version..."
    docker build -q -f Dockerfile --target "$component" --build-arg "FLWR_VERSION=$version" \
      -t "flwr/$component:$version" "$context" >/dev/null
  fi
done
rm -rf "$context"
echo "stand-ins ready: flwr/superlink:$version flwr/supernode:$version flwr/superexec:$version"
