#!/usr/bin/env bash
# Train with N CPU processes started by `accelerate launch`.
#
#   launch/accelerate_cpu.sh NPROC CONFIG.yaml [key=value ...]
#
# `accelerate launch --cpu --num_processes N` starts a single process (accelerate 1.16), so
# this uses the multi-GPU mode, which starts N processes through torch's launcher. dist_bnn
# then finds RANK and WORLD_SIZE and creates a gloo group. Port 0 lets the OS pick a free
# rendezvous port instead of accelerate's fixed default, 29500.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: $0 NPROC CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
nproc=$1
shift
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
exec accelerate launch --multi_gpu --num_processes "$nproc" --num_machines 1 \
    --mixed_precision no --dynamo_backend no --main_process_port 0 \
    -m dist_bnn train "$@"
