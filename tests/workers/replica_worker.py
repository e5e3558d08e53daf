"""Worker for the replica-check test: rank 1 perturbs one weight in mode "perturb".

Usage (under torchrun): replica_worker.py OUT_DIR perturb|same
Writes OUT_DIR/rank_<r>.json with the outcome of check_replicas on that rank.
"""

import json
import sys
from pathlib import Path

import ignite.distributed as idist
import torch

from dist_bnn.checkpoint.replicas import check_replicas
from dist_bnn.errors import ReplicaMismatchError
from dist_bnn.models import MLP


def main(local_rank: int, out_dir: Path, mode: str) -> None:
    torch.manual_seed(0)
    model = MLP(4, [8], 3)
    if mode == "perturb" and idist.get_rank() == 1:
        with torch.no_grad():
            model[0].weight[0, 0] += 1e-6
    try:
        check_replicas(model)
        outcome = {"error": None}
    except ReplicaMismatchError as err:
        outcome = {"error": str(err)}
    (out_dir / f"rank_{idist.get_rank()}.json").write_text(json.dumps(outcome))


if __name__ == "__main__":
    with idist.Parallel(backend="gloo") as parallel:
        parallel.run(main, Path(sys.argv[1]), sys.argv[2])
