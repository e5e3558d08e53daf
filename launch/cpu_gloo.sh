#!/usr/bin/env bash
# Train with N CPU processes on gloo (no GPU needed), one thread per process.
#
#   launch/cpu_gloo.sh NPROC CONFIG.yaml [key=value ...]
#
# On a machine with few cores more processes are slower, not faster: use this to test the
# distributed path, and one process to train quickly.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: $0 NPROC CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
nproc=$1
shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Gloo picks a network interface by the host name; loopback keeps a one-machine job local.
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
exec torchrun --standalone --nproc-per-node "$nproc" -m dist_bnn train "$@" distributed.backend=gloo
