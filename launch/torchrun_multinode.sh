#!/usr/bin/env bash
# Train on several machines with torchrun's c10d rendezvous: run this same command on every node.
#
#   NNODES=2 NPROC_PER_NODE=4 RDZV_ENDPOINT=node0.cluster:29400 RDZV_ID=digits-001 \
#       launch/torchrun_multinode.sh configs/digits_sghmc.yaml run.dir=/shared/runs/digits
#
# Variables:
#   NNODES          number of machines (torchrun --nnodes)
#   NPROC_PER_NODE  processes per machine, usually its number of GPUs (torchrun --nproc-per-node)
#   RDZV_ENDPOINT   host:port of the rendezvous. The agent on that host serves it, so the port
#                   must be free there and reachable from every node.
#   RDZV_ID         name shared by the nodes of one job; another job on the same endpoint needs
#                   another name
#   LOCAL_ADDR      optional: the address this node announces to the others. Without it torchrun
#                   announces the host's fully qualified domain name.
#
# run.dir must be on a file system that every node mounts: every rank writes its checkpoint
# shards there. Relaunching the same command on every node resumes from the newest checkpoint.
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: NNODES=N NPROC_PER_NODE=P RDZV_ENDPOINT=HOST:PORT RDZV_ID=NAME $0 CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
require() {
    if [[ -z ${!1:-} ]]; then
        echo "$0: $1 is not set; set it to $2" >&2
        exit 2
    fi
}
require NNODES "the number of machines"
require NPROC_PER_NODE "the number of processes per machine"
require RDZV_ENDPOINT "host:port of the rendezvous, on one of the machines"
require RDZV_ID "a name that the machines of this job share"

local_addr=()
if [[ -n ${LOCAL_ADDR:-} ]]; then
    local_addr=(--local-addr "$LOCAL_ADDR")
fi
exec torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID" \
    "${local_addr[@]}" -m dist_bnn train "$@"
