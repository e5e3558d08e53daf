#!/usr/bin/env bash
# Train on one machine with N processes under torchrun: one per GPU (NCCL), or N CPU
# processes on gloo when there is no GPU.
#
#   launch/torchrun_single_node.sh NPROC CONFIG.yaml [key=value ...]
#   launch/torchrun_single_node.sh 2 configs/digits_sghmc.yaml run.dir=runs/digits
#
# Relaunching the same command resumes from the newest checkpoint in run.dir.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: $0 NPROC CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
nproc=$1
shift
# --standalone binds the rendezvous to a free port on localhost, so two jobs on one machine
# never collide.
exec torchrun --standalone --nproc-per-node "$nproc" -m dist_bnn train "$@"
