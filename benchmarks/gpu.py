"""GPU figures: training samples per second, checkpoint bandwidth, async blocking and weak scaling.

Runs unchanged on a machine with one or more NVIDIA GPUs (NCCL). A wide MLP of about 25 M
parameters (the size of a ResNet-50) keeps each GPU busy on digits-shaped inputs. Every rank
gets ``--per-rank-batch`` examples per step, so the global batch grows with the GPU count
(weak scaling). For 1 GPU and for all GPUs it reports:

- training samples per second of dist_bnn's job (median epoch time, first epoch left out);
- synchronous checkpoint seconds and GB/s, and the seconds an async save blocks training;
- weak-scaling efficiency = samples/s(N GPUs) / (N x samples/s(1 GPU)), target >= 0.9.

    bash benchmarks/gpu.sh          # or: python benchmarks/gpu.py --repeats 5

NOTE: its NCCL path has not run yet. On a CPU machine it stops with exit code 2 before any
measurement.
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
from _common import bare_manifest, machine, median, torchrun  # noqa: E402

HIDDEN = "[4096,4096,2048]"  # 64*4096 + 4096*4096 + 4096*2048 + 2048*10 parameters: about 25 M


def worker(args: argparse.Namespace) -> None:
    import ignite.distributed as idist
    import torch

    from dist_bnn import distributed
    from dist_bnn.checkpoint import manager
    from epoch_time import run_dist_bnn

    logging.basicConfig(level=logging.WARNING)
    idist.initialize("nccl")
    world_size = distributed.world_size()
    overrides = [
        f"model.hidden_sizes={HIDDEN}", f"data.batch_size={args.per_rank_batch * world_size}",
        "distributed.backend=nccl",
    ]
    results: dict[str, list[float]] = {"epoch": [], "sync": [], "blocked": [], "bytes": []}
    with tempfile.TemporaryDirectory(prefix="dist-bnn-gpu-") as scratch:
        scratch_dir = Path(distributed.broadcast_json(scratch))
        for _ in range(args.repeats):
            results["epoch"].append(median(run_dist_bnn(args.epochs, scratch_dir, overrides)))

        from dist_bnn.models import MLP
        from dist_bnn.samplers import SGHMC

        model = idist.auto_model(MLP(64, json.loads(HIDDEN), 10))
        optimizer = SGHMC(model.parameters(), lr=0.01, num_data=1000)
        asynchronous = manager.AsyncCheckpointer()
        for repeat in range(args.repeats):
            run_dir = scratch_dir / f"ckpt{repeat}"
            torch.cuda.synchronize()
            distributed.barrier()
            start = time.perf_counter()
            path = manager.save_checkpoint(run_dir, model, optimizer, bare_manifest(2 * repeat + 1, world_size))
            results["sync"].append(time.perf_counter() - start)
            results["bytes"].append(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()))
            torch.cuda.synchronize()
            distributed.barrier()
            results["blocked"].append(asynchronous.save(run_dir, model, optimizer, bare_manifest(2 * repeat + 2, world_size)))
            asynchronous.commit_pending()
    if distributed.is_writer():
        Path(args.out).write_text(json.dumps({**results, "world_size": world_size}))
    idist.finalize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per repetition (default 6)")
    parser.add_argument("--per-rank-batch", type=int, default=256, help="examples per GPU per step (default 256)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:
        print("benchmarks/gpu.py: no CUDA device; the GPU figures need a GPU machine", file=sys.stderr)
        return 2
    print(f"machine: {machine()}, {gpus} x {torch.cuda.get_device_name(0)}")
    throughput = {}
    with tempfile.TemporaryDirectory(prefix="dist-bnn-gpu-") as scratch:
        for nproc in sorted({1, gpus}):
            out = Path(scratch) / f"gpu{nproc}.json"
            torchrun(Path(__file__), nproc, [
                "--worker", "--out", str(out), "--repeats", str(args.repeats), "--epochs", str(args.epochs),
                "--per-rank-batch", str(args.per_rank_batch),
            ])
            r = json.loads(out.read_text())
            # digits: 1078 training examples; an epoch drops the incomplete last batch.
            per_epoch = 1078 // (args.per_rank_batch * nproc) * args.per_rank_batch * nproc
            throughput[nproc] = per_epoch / median(r["epoch"])
            sync, size = median(r["sync"]), median(r["bytes"])
            print(f"{nproc} GPU(s): {throughput[nproc]:.0f} samples/s; checkpoint {size / 1e9:.2f} GB in "
                  f"{sync:.3f} s ({size / sync / 1e9:.2f} GB/s); async save blocks {median(r['blocked']):.3f} s "
                  f"({median(r['blocked']) / sync:.3f} x synchronous)")
    if gpus > 1:
        efficiency = throughput[gpus] / (gpus * throughput[1])
        print(f"weak-scaling efficiency on {gpus} GPUs: {efficiency:.2f} (target >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
