"""Worker for the sharded-evaluation test: metrics of fixed weights on a 101-example set.

Usage (plain or under torchrun): eval_worker.py OUT_FILE
Rank 0 writes the metrics that every rank computed, as JSON.
"""

import json
import os
import sys
from pathlib import Path

import ignite.distributed as idist
import torch
from torch.utils.data import TensorDataset

from dist_bnn.data import build_eval_loader
from dist_bnn.evaluation.bma import evaluate_weights
from dist_bnn.likelihoods import Categorical
from dist_bnn.models import MLP

NUM_EXAMPLES = 101


def main(local_rank: int, out_file: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(NUM_EXAMPLES, 5, generator=generator)
    targets = torch.randint(0, 3, (NUM_EXAMPLES,), generator=generator)
    torch.manual_seed(1)
    model = MLP(5, [16], 3)
    # A batch size that does not divide the shards, so the last batch is partial too.
    loader = build_eval_loader(
        TensorDataset(features, targets), batch_size=7,
        world_size=idist.get_world_size(), rank=idist.get_rank(),
    )
    metrics = evaluate_weights(model, loader, idist.device(), Categorical(3))
    if idist.get_rank() == 0:
        out_file.write_text(json.dumps(metrics))


if __name__ == "__main__":
    backend = "gloo" if "WORLD_SIZE" in os.environ else None
    with idist.Parallel(backend=backend) as parallel:
        parallel.run(main, Path(sys.argv[1]))
