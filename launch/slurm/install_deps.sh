#!/usr/bin/env bash
# Install what the SLURM and multi-node tests need on a Debian/Ubuntu machine: slurm-wlm (slurmctld,
# slurmd, sbatch, ...), munge and iproute2 (`ip netns`). Idempotent: returns at once when every
# command is already there; concurrent calls (parallel test workers) install once. Needs root and
# a working apt-get; exits 3 (and says why on stderr) where that is not possible.
set -euo pipefail

missing_packages() {
    local pkgs=()
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        || pkgs+=(slurm-wlm)
    command -v munged >/dev/null || pkgs+=(munge)
    command -v ip >/dev/null || pkgs+=(iproute2)
    echo "${pkgs[*]}"
}

cannot() { echo "install_deps.sh: $*" >&2; exit 3; }

missing=$(missing_packages)
[[ -z $missing ]] && exit 0
[[ $(id -u) == 0 ]] || cannot "$missing missing and not root, cannot install"
command -v apt-get >/dev/null || cannot "$missing missing and no apt-get on this machine"

# One installer at a time; whoever waited finds the packages there.
exec 9>/tmp/megadistill-install-deps.lock
flock 9
missing=$(missing_packages)
[[ -z $missing ]] && exit 0
echo "install_deps.sh: installing $missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt_get() { apt-get -q -o DPkg::Lock::Timeout=300 "$@" >&2; }
apt_get update || cannot "apt-get update failed"
# shellcheck disable=SC2086  # one argument per package
apt_get install -y --no-install-recommends $missing || cannot "apt-get install $missing failed"
