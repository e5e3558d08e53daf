"""Throughput of 2 ranks x 1 thread against 1 rank x 2 threads at the same global batch, and the
share of each step spent in the gradient all-reduce.

Both configurations run dist_bnn's training job on digits (``benchmarks/epoch_time.py``'s
worker, SGHMC, global batch 64) and report examples per second from the median epoch time. The
all-reduce share comes from a DDP loop on 2 ranks timed with and without gradient
synchronisation (``DistributedDataParallel.no_sync``): share = 1 - t(no sync) / t(sync).

    python benchmarks/scaling.py        # 5 repetitions, about 2 min

There is no target on a 2-core machine: two gloo ranks compete with each other for the two
cores that one rank with two threads uses alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DIGITS_CONFIG, machine, median, torchrun  # noqa: E402

EPOCH_TIME = Path(__file__).resolve().parent / "epoch_time.py"


def allreduce_worker(args: argparse.Namespace) -> None:
    import contextlib

    import ignite.distributed as idist
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from dist_bnn import distributed
    from dist_bnn.config import load_config
    from dist_bnn.data import load_splits
    from dist_bnn.models import MLP
    from dist_bnn.samplers import build_sampler

    idist.initialize("gloo")
    cfg = load_config(DIGITS_CONFIG, ["run.dir=unused", *args.overrides])
    splits = load_splits(cfg.data, cfg.training.seed)
    per_rank = cfg.data.batch_size // distributed.world_size()
    features, targets = splits.train.tensors[0][:per_rank], splits.train.tensors[1][:per_rank]
    model = DistributedDataParallel(MLP(splits.num_features, cfg.model.hidden_sizes, splits.num_classes))
    optimizer = build_sampler(cfg.sampler, model.parameters(), num_data=len(splits.train), noise_seed=1)

    def steps(sync: bool) -> float:
        distributed.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            with contextlib.nullcontext() if sync else model.no_sync():
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(features), targets).backward()
            optimizer.step()
        return (time.perf_counter() - start) / args.steps

    steps(True)  # warm-up, and DDP's bucket rebuild after the first iteration
    results: dict[str, list[float]] = {"sync": [], "no_sync": []}
    for _ in range(args.repeats):
        results["sync"].append(steps(True))
        results["no_sync"].append(steps(False))
    if distributed.is_writer():
        Path(args.out).write_text(json.dumps(results))
    idist.finalize()


def epoch_seconds(nproc: int, threads: int, args: argparse.Namespace, scratch: Path) -> float:
    out = scratch / f"epoch-{nproc}x{threads}.json"
    torchrun(EPOCH_TIME, nproc, [
        "--worker", "--out", str(out), "--repeats", str(args.repeats), "--epochs", str(args.epochs),
        "--threads", str(threads), *args.overrides,
    ])
    return median(json.loads(out.read_text())["dist_bnn"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per repetition (default 10)")
    parser.add_argument("--steps", type=int, default=50, help="steps per all-reduce timing (default 50)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.hidden_sizes=[512]")
    args = parser.parse_args(argv)
    if args.worker:
        allreduce_worker(args)
        return 0

    from dist_bnn.config import load_config
    from dist_bnn.data import load_splits

    cfg = load_config(DIGITS_CONFIG, ["run.dir=unused", *args.overrides])
    examples = len(load_splits(cfg.data, cfg.training.seed).train) // cfg.data.batch_size * cfg.data.batch_size
    with tempfile.TemporaryDirectory(prefix="dist-bnn-scaling-") as scratch:
        root = Path(scratch)
        one = epoch_seconds(1, 2, args, root)
        two = epoch_seconds(2, 1, args, root)
        out = root / "allreduce.json"
        torchrun(Path(__file__), 2, [
            "--worker", "--out", str(out), "--repeats", str(args.repeats), "--steps", str(args.steps), *args.overrides,
        ])
        steps = json.loads(out.read_text())
    sync, no_sync = median(steps["sync"]), median(steps["no_sync"])
    print(f"machine: {machine()}")
    print(f"dist_bnn on digits, global batch {cfg.data.batch_size}, medians of {args.repeats}")
    print(f"1 rank x 2 threads: {examples / one:.0f} examples/s (epoch {one * 1e3:.1f} ms)")
    print(f"2 ranks x 1 thread: {examples / two:.0f} examples/s (epoch {two * 1e3:.1f} ms) -> ratio {one / two:.2f}")
    print(f"2-rank DDP step: {sync * 1e3:.2f} ms with gradient all-reduce, {no_sync * 1e3:.2f} ms without -> all-reduce share {1 - no_sync / sync:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
