"""Epoch time of dist_bnn training against a hand-written DDP loop, 2 gloo ranks, same run.

Both sides train the same MLP on digits with the same SGHMC sampler, the same global batch and
the same data order source, in the same torchrun launch, alternating repetitions. dist_bnn runs
its full per-iteration bookkeeping (Ignite engine, resumable sampler, device-side loss sum and
the per-iteration preemption check) with validation, samples and checkpoints left out of the
timed epochs, so the ratio measures what exact resume costs per step.

    python benchmarks/epoch_time.py                   # 5 repetitions of 20 epochs, about 1 min

It prints the median epoch time of each side and their ratio (target: <= 1.03).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DIGITS_CONFIG, machine, median, torchrun  # noqa: E402


def run_dist_bnn(epochs: int, workdir: Path, overrides: list[str]) -> list[float]:
    """Train through dist_bnn's own job and return the wall time of each epoch after the first."""
    import ignite.distributed as idist
    from ignite.engine import Events

    from dist_bnn import distributed
    from dist_bnn.config import load_config
    from dist_bnn.training.run_dir import RunPlan, plan_run
    from dist_bnn.training.trainer import TrainingJob

    run_dir = workdir / f"run-{time.monotonic_ns()}"
    run_dir = Path(distributed.broadcast_json(str(run_dir)))
    cfg = load_config(DIGITS_CONFIG, [
        f"run.dir={run_dir}", f"training.num_epochs={epochs}", "training.validate_every_epochs=0",
        f"samples.start_epoch={epochs}", f"checkpoint.every_epochs={epochs}", "wandb.mode=disabled",
        *overrides,
    ])
    plan = RunPlan.from_json(distributed.broadcast_json(
        plan_run(run_dir, cfg, distributed.world_size()).to_json() if distributed.is_writer() else None
    ))
    job = TrainingJob(cfg, run_dir, plan)
    starts: list[float] = []
    job.engine.add_event_handler(Events.EPOCH_STARTED, lambda _: starts.append(time.perf_counter()))
    job.engine.run(job.train_loader, max_epochs=epochs)
    job.tracker.finish()
    idist.barrier()
    # From one epoch's start to the next: the epoch's steps and its end-of-epoch handlers. The
    # last epoch (sample, checkpoint, test evaluation) and the first (warm-up) are left out.
    return [b - a for a, b in zip(starts[1:-1], starts[2:])]


def run_hand_written(epochs: int, overrides: list[str]) -> list[float]:
    """A plain DDP loop with the same model, data, sampler and batch; return epoch times after
    the first."""
    import torch
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    from dist_bnn import distributed
    from dist_bnn.config import load_config
    from dist_bnn.data import load_splits
    from dist_bnn.models import MLP
    from dist_bnn.samplers import build_sampler

    cfg = load_config(DIGITS_CONFIG, ["run.dir=unused", *overrides])
    splits = load_splits(cfg.data, cfg.training.seed)
    world_size = distributed.world_size()
    sampler = DistributedSampler(splits.train, world_size, distributed.rank(), shuffle=True, seed=cfg.training.seed, drop_last=True)
    loader = DataLoader(splits.train, batch_size=cfg.data.batch_size // world_size, sampler=sampler, drop_last=True)
    torch.manual_seed(cfg.training.seed)
    model = DistributedDataParallel(MLP(splits.num_features, cfg.model.hidden_sizes, splits.num_classes, cfg.model.activation))
    optimizer = build_sampler(cfg.sampler, model.parameters(), num_data=len(splits.train), noise_seed=1)
    times = []
    for epoch in range(epochs):
        start = time.perf_counter()
        sampler.set_epoch(epoch)
        loss_sum = torch.zeros(())
        for features, targets in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(features), targets)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
        distributed.all_reduce_sum(loss_sum).item()
        times.append(time.perf_counter() - start)
    return times[1:]


def worker(args: argparse.Namespace) -> None:
    import ignite.distributed as idist

    from dist_bnn import distributed

    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    idist.initialize("gloo")
    results: dict[str, list[float]] = {"hand-written": [], "dist_bnn": []}
    with tempfile.TemporaryDirectory(prefix="dist-bnn-epoch-time-") as scratch:
        for _ in range(args.repeats):
            results["hand-written"].append(median(run_hand_written(args.epochs, args.overrides)))
            results["dist_bnn"].append(median(run_dist_bnn(args.epochs, Path(scratch), args.overrides)))
    if distributed.is_writer():
        Path(args.out).write_text(json.dumps(results))
    idist.finalize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="repetitions of each side (default 5)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per repetition (default 20)")
    parser.add_argument("--nproc", type=int, default=2, help="gloo ranks (default 2)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per rank (default: torchrun's choice)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides for both sides, e.g. model.hidden_sizes=[512]")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    with tempfile.TemporaryDirectory(prefix="dist-bnn-epoch-time-") as scratch:
        out = Path(scratch) / "result.json"
        torchrun(Path(__file__), args.nproc, [
            "--worker", "--out", str(out), "--repeats", str(args.repeats), "--epochs", str(args.epochs),
            "--threads", str(args.threads), *args.overrides,
        ])
        results = json.loads(out.read_text())
    base, ours = median(results["hand-written"]), median(results["dist_bnn"])
    print(f"machine: {machine()}")
    print(f"{args.nproc} gloo ranks, {args.epochs} epochs x {args.repeats} repetitions, overrides: {args.overrides or 'none'}")
    print(f"hand-written DDP loop: median epoch {base * 1e3:.2f} ms  (repetition medians {_ms(results['hand-written'])})")
    print(f"dist_bnn:              median epoch {ours * 1e3:.2f} ms  (repetition medians {_ms(results['dist_bnn'])})")
    print(f"ratio dist_bnn / hand-written: {ours / base:.3f}  (target <= 1.03)")
    return 0


def _ms(values: list[float]) -> str:
    return ", ".join(f"{v * 1e3:.1f}" for v in values)


if __name__ == "__main__":
    sys.exit(main())
