#!/usr/bin/env bash
# Two "nodes" on one machine: two network namespaces joined by a veth pair, each with its own
# address, for multi-node torchrun tests without a second machine.
#
#   launch/slurm/netns_nodes.sh up NAME [SUBNET]  # namespaces NAME-0/NAME-1, devices NAMEv0/NAMEv1
#   launch/slurm/netns_nodes.sh cut NAME          # node 0 link down: it falls off the network
#   launch/slurm/netns_nodes.sh down NAME         # delete both namespaces and the veth pair
#
# Node k gets SUBNET.(k+1)/24 on device NAMEvk (SUBNET default 10.200.0), and its own `lo`. The
# addresses live only inside these namespaces: no route to or from the host is added. Inside node k
# the names NAME-0 and NAME-1 resolve to the two addresses and this machine's hostname to node k's
# own (/etc/netns/NAME-k/hosts). `up` prints one line per node: "namespace address device". Run a
# command on node k with `ip netns exec NAME-k CMD`. NAME: at most 12 letters or digits (device
# names are limited to 15 characters).
set -euo pipefail

die() { echo "netns_nodes.sh: $*" >&2; exit 1; }

up() {
    local name=$1 subnet=$2 k
    [[ $name =~ ^[a-zA-Z0-9]{1,12}$ ]] || die "NAME must be 1-12 letters or digits (got '$name')"
    [[ $subnet =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] \
        || die "SUBNET must be three numbers like 10.200.0 (got '$subnet')"
    ip link add "${name}v0" type veth peer name "${name}v1"
    for k in 0 1; do
        ip netns add "$name-$k"
        ip link set "${name}v$k" netns "$name-$k"
        ip -n "$name-$k" addr add "$subnet.$((k + 1))/24" dev "${name}v$k"
        ip -n "$name-$k" link set lo up
        # TCP gives up on an unanswered connection after ~15 min by default; inside these
        # namespaces after a few seconds, so that a node that lost its peer notices it promptly.
        ip netns exec "$name-$k" sysctl -q -w net.ipv4.tcp_retries2=4
        ip -n "$name-$k" link set "${name}v$k" up
    done
    # Host names: `ip netns exec` mounts /etc/netns/NS/hosts over /etc/hosts. Each node resolves
    # both node names, and this machine's hostname to its own address, as a real node would.
    for k in 0 1; do
        mkdir -p "/etc/netns/$name-$k"
        {
            echo "127.0.0.1 localhost"
            echo "$subnet.1 $name-0$([[ $k == 0 ]] && echo " $(hostname)")"
            echo "$subnet.2 $name-1$([[ $k == 1 ]] && echo " $(hostname)")"
        } > "/etc/netns/$name-$k/hosts"
    done
    for k in 0 1; do echo "$name-$k $subnet.$((k + 1)) ${name}v$k"; done
}

down() {
    local name=$1 k
    for k in 0 1; do
        ip netns pids "$name-$k" 2>/dev/null | xargs -r kill -KILL
        ip netns del "$name-$k" 2>/dev/null || true
        rm -rf "/etc/netns/${name:?}-$k"
    done
    # A pair that never reached its namespaces still sits in the host namespace.
    ip link del "${name}v0" 2>/dev/null || true
}

case "${1:-}" in
    up) [[ $# == 2 || $# == 3 ]] || die "usage: $0 up NAME [SUBNET]"; up "$2" "${3:-10.200.0}" ;;
    cut) [[ $# == 2 ]] || die "usage: $0 cut NAME"; ip -n "$2-0" link set "${2}v0" down ;;
    down) [[ $# == 2 ]] || die "usage: $0 down NAME"; down "$2" ;;
    *) die "usage: $0 up|cut|down NAME" ;;
esac
