#!/usr/bin/env bash
# ./run.sh [flwr run options]     set up .venv, then run the default PM-AFL federation
#                                 (10 simulated clients on scikit-learn's digits) and summarise it
# ./run.sh test [pytest options]  set up .venv, then run the test suite
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  echo "Setting up .venv (first time: a few minutes)..."
  python3 -m venv .venv
  # No wheel cache: torch's CUDA build alone is gigabytes, and a cached copy doubles the disk it needs.
  .venv/bin/python -m pip install -q --no-cache-dir --upgrade pip
  .venv/bin/python -m pip install -q --no-cache-dir -e ".[test]"
  # torch and torchvision wheels must match; this import fails when they do not.
  .venv/bin/python -c "import torchvision.ops"
  touch .venv/.installed
fi
source .venv/bin/activate
# The SuperLink must not try to install the app's dependencies from the network.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

if [ "${1:-}" = "test" ]; then
  shift
  exec python -m pytest -q "$@"
fi

# Pre-train the run's teacher (if not cached) before the federation, not inside a round: the same
# --run-config as the run decides which teacher that is.
configs=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --run-config) configs+=(--run-config "${args[i + 1]:-}") ;;
    --run-config=*) configs+=(--run-config "${args[i]#--run-config=}") ;;
  esac
done
pmafl-teacher pretrain "${configs[@]}"

# Ray hides GPUs from actors that reserve none: with a GPU, ten clients share each one.
federation="num-supernodes=10 client-resources-num-cpus=1"
if python -c "import sys, torch; sys.exit(torch.cuda.device_count() == 0)" 2>/dev/null; then
  federation+=" client-resources-num-gpus=0.1"
fi
started=$(date +%s)
flwr run . --stream --federation-config "$federation" \
  --run-config "results-dir='$PWD/results'" "$@"
# The log stream can end just before the ServerApp's last write.
for _ in $(seq 30); do
  python -m pmafl.results --latest results --newer-than "$started" >/dev/null 2>&1 && break
  sleep 1
done
echo
python -m pmafl.results --latest results --newer-than "$started"
