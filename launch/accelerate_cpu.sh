#!/usr/bin/env bash
# Train with N processes started by `accelerate launch` with launch/accelerate_config.yaml:
# CPU processes on gloo without GPUs, one process per GPU with them.
#
#   launch/accelerate_cpu.sh NPROC CONFIG.yaml [key=value ...]
#
# `accelerate launch --cpu --num_processes N` starts a single process (accelerate 1.16), so the
# config file uses the multi-GPU mode, which starts N processes through torch's launcher.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: $0 NPROC CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
nproc=$1
shift
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
exec accelerate launch --config_file "$(dirname "$0")/accelerate_config.yaml" \
    --num_processes "$nproc" -m dist_bnn train "$@"
