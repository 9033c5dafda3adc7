#!/usr/bin/env bash
# A one-host SLURM cluster (munged + slurmctld + slurmd on this machine) whose whole state lives in
# one directory, so that several can run side by side and nothing under /etc is touched.
#
#   launch/slurm/local_cluster.sh start DIR   # then: export SLURM_CONF=DIR/slurm.conf
#   launch/slurm/local_cluster.sh stop DIR    # cancels its jobs, stops the three daemons
#
# Needs root and the Debian packages slurm-wlm and munge (launch/slurm/install_deps.sh).
# SLURMCTLD_PORT / SLURMD_PORT pick the ports (free ones by default); CRED_EXPIRE_S (default 10)
# is also how long a requeued job waits before it may start again.
set -euo pipefail

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

write_conf() {
    local dir=$1 node
    # `slurmd -C` prints this host's real NodeName/CPUs/RealMemory line; slurmd drains a node whose
    # declared resources exceed what it finds, so the config is taken from the host itself.
    node=$(slurmd -C | head -n 1)
    cat > "$dir/slurm.conf" <<EOF
ClusterName=megadistill
SlurmctldHost=$(hostname)(127.0.0.1)
SlurmctldPort=${SLURMCTLD_PORT:-$(free_port)}
SlurmdPort=${SLURMD_PORT:-$(free_port)}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's next start (120 s by default): short, for tests.
AuthInfo=socket=$dir/munge.sock,cred_expire=${CRED_EXPIRE_S:-10}
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
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
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    : > "$dir/plugstack.conf"
}

wait_for_idle() {
    local dir=$1 state=""
    for _ in $(seq 60); do
        state=$(SLURM_CONF=$dir/slurm.conf sinfo -h -o %T 2>/dev/null || true)
        [[ $state == idle ]] && return 0
        sleep 0.5
    done
    tail -n 20 "$dir"/log/*.log >&2 || true
    die "the node did not become idle within 30 s (last state: '${state:-none}'); logs above"
}

start() {
    local dir=$1
    [[ $(id -u) == 0 ]] || die "must run as root (slurmd starts jobs as their owner)"
    if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
        die "slurmctld/munged not found: run launch/slurm/install_deps.sh first"
    fi
    mkdir -p "$dir"/{state,spool,log}
    chmod 755 "$dir"  # munged wants its socket directory searchable by all
    # A private munge key: this cluster trusts only itself.
    [[ -s $dir/munge.key ]] || head -c 1024 /dev/urandom > "$dir/munge.key"
    chmod 600 "$dir/munge.key"
    munged --socket="$dir/munge.sock" --key-file="$dir/munge.key" --pid-file="$dir/munged.pid" \
        --log-file="$dir/log/munged.log" --seed-file="$dir/munged.seed" \
        || die "munged did not start; see $dir/log/munged.log"
    write_conf "$dir"
    slurmctld -f "$dir/slurm.conf" || die "slurmctld did not start; see $dir/log/slurmctld.log"
    slurmd -f "$dir/slurm.conf" -N "$(hostname)" \
        || die "slurmd did not start; see $dir/log/slurmd.log"
    wait_for_idle "$dir"
    echo "export SLURM_CONF=$dir/slurm.conf"
}

stop_pidfile() {
    local pidfile=$1 pid
    [[ -s $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
}

stop() {
    local dir=$1 jobs
    [[ -d $dir ]] || die "no cluster in $dir"
    if [[ -f $dir/slurm.conf ]]; then
        export SLURM_CONF=$dir/slurm.conf
        # Jobs first, through SLURM itself, so that their slurmstepd and tasks go away cleanly.
        jobs=$(squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086  # one argument per job id
            scancel --quiet $jobs || true
            for _ in $(seq 60); do
                [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
                sleep 0.5
            done
        fi
    fi
    stop_pidfile "$dir/slurmd.pid"
    stop_pidfile "$dir/slurmctld.pid"
    stop_pidfile "$dir/munged.pid"
}

case "${1:-}" in
    start) [[ $# == 2 ]] || die "usage: $0 start DIR"; start "$(realpath -m "$2")" ;;
    stop) [[ $# == 2 ]] || die "usage: $0 stop DIR"; stop "$(realpath -m "$2")" ;;
    *) die "usage: $0 start|stop DIR" ;;
esac
