#!/usr/bin/env bash
# A SLURM cluster on this machine (munged + slurmctld + slurmd) whose whole state lives in one
# directory, so that several can run side by side and nothing under /etc/slurm is touched.
#
#   launch/slurm/local_cluster.sh start DIR          # one node: this host
#   launch/slurm/local_cluster.sh start DIR NETNS    # two nodes NETNS-0 and NETNS-1 (see below)
#   launch/slurm/local_cluster.sh stop DIR           # cancels its jobs, stops the daemons
#
# Clients need SLURM_CONF=DIR/slurm.conf. With NETNS the nodes are the two network namespaces made
# by `netns_nodes.sh up NETNS`: one slurmd in each (slurmctld beside the first), so a job really
# spans two hosts with their own addresses; run sbatch/squeue/scancel inside NETNS-0
# (`ip netns exec NETNS-0 ...`), the only place that reaches slurmctld.
#
# Needs root and the Debian packages slurm-wlm and munge (launch/slurm/install_deps.sh).
# SLURMCTLD_PORT / SLURMD_PORT pick the ports (free ones by default); CRED_EXPIRE_S (default 10)
# is also how long a requeued job waits before it may start again.
set -euo pipefail

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

# "NAME ADDRESS NETNS" per node; NETNS is "-" for the host itself.
nodes() {
    local netns=$1 k
    if [[ $netns == - ]]; then
        echo "$(hostname) 127.0.0.1 -"
        return
    fi
    for k in 0 1; do
        echo "$netns-$k $(ip -n "$netns-$k" -4 -o addr show dev "${netns}v$k" \
            | awk '{split($4, a, "/"); print a[1]}') $netns-$k"
    done
}

# Run "$@" on the node whose namespace is $1 ("-": here). Like `ip netns exec`, with the node's
# /etc/hosts, but /sys stays the host's: slurmd needs the cgroup mounts under it.
on_node() {
    local netns=$1
    shift
    if [[ $netns == - ]]; then "$@"; return; fi
    # shellcheck disable=SC2016  # $0 and $@ belong to the inner shell
    nsenter --net="/run/netns/$netns" unshare --mount --propagation private \
        sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' "/etc/netns/$netns/hosts" "$@"
}

write_conf() {
    local dir=$1 netns=$2 name addr ns first=""
    cat > "$dir/slurm.conf" <<EOF
ClusterName=megadistill
SlurmctldPort=${SLURMCTLD_PORT:-$(free_port)}
SlurmdPort=${SLURMD_PORT:-$(free_port)}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's next start (120 s by default): short, for tests.
AuthInfo=socket=$dir/munge.sock,cred_expire=${CRED_EXPIRE_S:-10}
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
PlugStackConfig=$dir/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
# Look at pending jobs every second (default 60 s), so that a requeued job starts without delay.
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.log
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=10
EOF
    while read -r name addr ns; do
        # slurmctld recognises itself by this machine's hostname; clients use the address.
        [[ -n $first ]] || { first=$name; echo "SlurmctldHost=$(hostname)($addr)" >> "$dir/slurm.conf"; }
        # `slurmd -C` prints this machine's real CPUs/RealMemory; slurmd drains a node whose
        # declared resources exceed what it finds, so the node line is taken from the host itself.
        echo "$(slurmd -C | head -n 1 | sed "s/^NodeName=[^ ]*/NodeName=$name/")" \
            "NodeAddr=$addr State=UNKNOWN" >> "$dir/slurm.conf"
    done < <(nodes "$netns")
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$dir/slurm.conf"
    : > "$dir/plugstack.conf"
}

# Run a client command against the cluster in $dir, from the node that reaches slurmctld.
client() {
    local dir=$1
    shift
    SLURM_CONF=$dir/slurm.conf on_node "$(cat "$dir/netns")" "$@"
}

wait_for_idle() {
    local dir=$1 want=$2 states=""
    for _ in $(seq 60); do
        states=$(client "$dir" sinfo -h -N -o %T 2>/dev/null | sort | uniq -c | xargs || true)
        [[ $states == "$want idle" ]] && return 0
        sleep 0.5
    done
    tail -n 20 "$dir"/log/*.log >&2 || true
    die "the nodes did not become idle within 30 s (last: '${states:-none}'); logs above"
}

start() {
    local dir=$1 netns=$2 name addr ns count=0 first_ns
    [[ $(id -u) == 0 ]] || die "must run as root (slurmd starts jobs as their owner)"
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        die "slurmctld/munged not found: run launch/slurm/install_deps.sh first"
    fi
    if [[ $netns != - ]]; then
        ip netns pids "$netns-1" >/dev/null 2>&1 || die "no network namespaces $netns-0/1 (netns_nodes.sh up)"
    fi
    mkdir -p "$dir"/{state,spool,log}
    chmod 755 "$dir"  # munged wants its socket directory searchable by all
    # A private munge key: this cluster trusts only itself. munged serves every namespace through
    # its socket file.
    [[ -s $dir/munge.key ]] || head -c 1024 /dev/urandom > "$dir/munge.key"
    chmod 600 "$dir/munge.key"
    munged --socket="$dir/munge.sock" --key-file="$dir/munge.key" --pid-file="$dir/munged.pid" \
        --log-file="$dir/log/munged.log" --seed-file="$dir/munged.seed" \
        || die "munged did not start; see $dir/log/munged.log"
    write_conf "$dir" "$netns"
    first_ns=$(nodes "$netns" | awk 'NR == 1 {print $3}')
    echo "$first_ns" > "$dir/netns"
    on_node "$first_ns" slurmctld -f "$dir/slurm.conf" \
        || die "slurmctld did not start; see $dir/log/slurmctld.log"
    while read -r name addr ns; do
        mkdir -p "$dir/spool/$name"
        on_node "$ns" slurmd -f "$dir/slurm.conf" -N "$name" \
            || die "slurmd $name did not start; see $dir/log/slurmd-$name.log"
        count=$((count + 1))
    done < <(nodes "$netns")
    wait_for_idle "$dir" "$count"
    echo "export SLURM_CONF=$dir/slurm.conf"
}

# TERM every daemon at once (each takes ~2 s to wind down), KILL what is left after 10 s.
stop_daemons() {
    local pidfile pid pids=()
    for pidfile in "$@"; do
        [[ -s $pidfile ]] || continue
        pid=$(cat "$pidfile")
        kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    done
    for _ in $(seq 100); do
        any_alive "${pids[@]}" || return 0
        sleep 0.1
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
}

any_alive() {
    local pid
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done
    return 1
}

stop() {
    local dir=$1 jobs
    [[ -d $dir ]] || die "no cluster in $dir"
    if [[ -f $dir/slurm.conf && -f $dir/netns ]]; then
        # Jobs first, through SLURM itself, so that their slurmstepd and tasks go away cleanly.
        jobs=$(client "$dir" squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086  # one argument per job id
            client "$dir" scancel --quiet $jobs || true
            for _ in $(seq 60); do
                [[ -z $(client "$dir" squeue -h -o %i 2>/dev/null) ]] && break
                sleep 0.5
            done
        fi
    fi
    stop_daemons "$dir"/slurmd-*.pid "$dir/slurmctld.pid" "$dir/munged.pid"
}

case "${1:-}" in
    start) [[ $# == 2 || $# == 3 ]] || die "usage: $0 start DIR [NETNS]"
           start "$(realpath -m "$2")" "${3:--}" ;;
    stop) [[ $# == 2 ]] || die "usage: $0 stop DIR"; stop "$(realpath -m "$2")" ;;
    *) die "usage: $0 start DIR [NETNS] | stop DIR" ;;
esac
