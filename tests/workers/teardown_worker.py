"""Worker for the teardown test: run ``dist-bnn train``, then count the DDP models still alive.

Usage (under torchrun): teardown_worker.py OUT_DIR TRAIN_ARGS...
Writes OUT_DIR/rank_<r>.json with the exit code and the number of live DDP models. Training
destroys the process group before it returns, so a DDP model still alive after a garbage
collection would outlive its group until interpreter exit.
"""

import gc
import json
import os
import sys
from pathlib import Path

from torch.nn.parallel import DistributedDataParallel

from dist_bnn.cli import main

if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    exit_code = main(["train", *sys.argv[2:]])
    gc.collect()
    live = sum(isinstance(obj, DistributedDataParallel) for obj in gc.get_objects())
    rank = os.environ["RANK"]
    (out_dir / f"rank_{rank}.json").write_text(json.dumps({"exit_code": exit_code, "live_ddp_models": live}))
    sys.exit(exit_code)
