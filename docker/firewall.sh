#!/usr/bin/env bash
# docker/firewall.sh: let only the federation's own machines reach the SuperLink's published port.
# Flower 1.41 serves the Control API (`flwr run`, `flwr stop`, `flwr supernode register`) on that
# port, unauthenticated, beside the Fleet API that the SuperNodes use.
#
#   sudo docker/firewall.sh allow [--port 8000] ADDRESS|CIDR...   only these sources may connect
#   sudo docker/firewall.sh remove [--port 8000]                  anyone who reaches it may again
#   sudo docker/firewall.sh show [--port 8000]
#
# The rules sit in a chain of their own, PMAFL-SUPERLINK-<port>, jumped to from DOCKER-USER: the
# chain Docker evaluates before its own rules for every packet it forwards to a container, so for
# connections to a published port (INPUT never sees them). The jump takes the connections that
# Docker's DNAT sent on from the host's <port> (conntrack's original destination port): the
# listed sources go on to Docker's own rules, every other one gets a TCP reset. Connections from
# this host itself, its containers included (they reach a published port through Docker's proxy),
# and between containers on one network do not pass that DNAT and are left alone. `allow` again
# replaces the list in one atomic step (iptables-restore); both commands can be run any number of
# times. IPv4 only. The kernel forgets the rules at a reboot: run `allow` again then, before the
# stack starts (start it with SUPERLINK_RESTART=no, so that the SuperLink waits for you).
set -euo pipefail

usage() { sed -n '6,8s/^# *//p' "$0" >&2; exit 2; }

action=${1:-}
[ $# -gt 0 ] && shift
port=8000
if [ "${1:-}" = --port ]; then
  [ $# -ge 2 ] || usage
  port=$2
  shift 2
fi
[[ $port =~ ^[0-9]+$ ]] || { echo "firewall.sh: --port takes a port number, not '$port'" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "firewall.sh: run as root (iptables)" >&2; exit 1; }
iptables -w -n -L DOCKER-USER >/dev/null 2>&1 ||
  { echo "firewall.sh: no DOCKER-USER chain: start the Docker engine first" >&2; exit 1; }

chain=PMAFL-SUPERLINK-$port
jump=(-p tcp -m conntrack --ctstate DNAT --ctdir ORIGINAL --ctorigdstport "$port" -j "$chain")

remove() {
  while iptables -w -C DOCKER-USER "${jump[@]}" 2>/dev/null; do
    iptables -w -D DOCKER-USER "${jump[@]}"
  done
  if iptables -w -n -L "$chain" >/dev/null 2>&1; then
    iptables -w -F "$chain"
    iptables -w -X "$chain"
  fi
}

case $action in
  allow)
    [ $# -gt 0 ] || usage
    # One transaction: the chain is (re)filled and the jump added together, or nothing changes
    # (a bad address included). Declaring the chain empties it, even with --noflush.
    {
      echo "*filter"
      echo ":$chain - [0:0]"
      for source in "$@"; do echo "-A $chain -s $source -j RETURN"; done
      echo "-A $chain -p tcp -j REJECT --reject-with tcp-reset"
      iptables -w -C DOCKER-USER "${jump[@]}" 2>/dev/null || echo "-I DOCKER-USER 1 ${jump[*]}"
      echo "COMMIT"
    } | iptables-restore -w --noflush
    echo "port $port: only $* may connect"
    ;;
  remove)
    remove
    echo "port $port: no rules of firewall.sh left"
    ;;
  show)
    iptables -w -S DOCKER-USER
    iptables -w -S "$chain" 2>/dev/null || echo "no $chain: port $port is open to anyone who reaches it"
    ;;
  *) usage ;;
esac
