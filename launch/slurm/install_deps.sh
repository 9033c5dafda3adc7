#!/usr/bin/env bash
# Install what the SLURM and multi-node tests need on a Debian/Ubuntu machine: slurm-wlm (slurmctld,
# slurmd, sbatch, ...), munge and iproute2 (`ip netns`). Idempotent: returns at once when every
# command is already there. Needs root and a working apt-get; exits 3 (and says why) otherwise.
set -euo pipefail

missing=()
command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    || missing+=(slurm-wlm)
command -v munged >/dev/null || missing+=(munge)
command -v ip >/dev/null || missing+=(iproute2)
(( ${#missing[@]} == 0 )) && exit 0

if [[ $(id -u) != 0 ]]; then
    echo "install_deps.sh: ${missing[*]} missing and not root, cannot install" >&2
    exit 3
fi
if ! command -v apt-get >/dev/null; then
    echo "install_deps.sh: ${missing[*]} missing and no apt-get on this machine" >&2
    exit 3
fi
echo "install_deps.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >&2 || { echo "install_deps.sh: apt-get update failed" >&2; exit 3; }
apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
    || { echo "install_deps.sh: apt-get install ${missing[*]} failed" >&2; exit 3; }
