"""Checkpoint cost: dist_bnn's synchronous and async saves against torch.save and dd, same run.

A model plus SGHMC state of about 150 MB (an MLP of 18.4 M parameters and its momentum) is
saved on 2 gloo ranks, alternating with the baselines in the same launch:

- dist_bnn synchronous save (``save_checkpoint``: DCP shards, RNG files, sha256 of every file,
  manifest, fsyncs, rename), timed on rank 0 from a barrier to its return;
- dist_bnn async save (``AsyncCheckpointer``): the seconds training is blocked, and the time to
  the commit;
- ``torch.save`` of the same model and optimizer state dicts from rank 0, without and with an
  fsync of the file (the synchronous save fsyncs everything it writes);
- ``dd if=/dev/zero bs=1M conv=fsync`` of the same number of bytes to the same directory.

    python benchmarks/checkpoint_cost.py                 # 5 repetitions, about 1 min
    python benchmarks/checkpoint_cost.py --dir /scratch  # measure another file system

Targets: synchronous save <= 1.1 x torch.save, >= 50% of dd's bandwidth; async blocking <=
0.10 x the synchronous save.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bare_manifest, machine, median, torchrun  # noqa: E402

HIDDEN = [2560, 2560, 2560]
IN_FEATURES = 2048


def worker(args: argparse.Namespace) -> None:
    import ignite.distributed as idist
    import torch

    from dist_bnn import distributed
    from dist_bnn.checkpoint import manager
    from dist_bnn.models import MLP
    from dist_bnn.samplers import SGHMC

    idist.initialize("gloo")
    torch.manual_seed(0)
    model = idist.auto_model(MLP(IN_FEATURES, HIDDEN, 10))
    optimizer = SGHMC(model.parameters(), lr=0.01, num_data=1000)
    with torch.no_grad():
        for param in optimizer.param_groups[0]["params"]:
            optimizer.state[param]["momentum_buffer"].normal_()
    asynchronous = manager.AsyncCheckpointer()
    root = Path(args.dir)
    results: dict[str, list[float]] = {k: [] for k in ("sync", "async_blocked", "async_total", "torch_save", "torch_save_fsync", "dd", "bytes")}

    def manifest(epoch: int):  # type: ignore[no-untyped-def]
        return bare_manifest(epoch, distributed.world_size())

    for repeat in range(args.repeats):
        run_dir = root / f"run{repeat}"
        distributed.barrier()
        start = time.perf_counter()
        path = manager.save_checkpoint(run_dir, model, optimizer, manifest(2 * repeat + 1))
        results["sync"].append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        results["bytes"].append(size)

        distributed.barrier()
        start = time.perf_counter()
        results["async_blocked"].append(asynchronous.save(run_dir, model, optimizer, manifest(2 * repeat + 2)))
        asynchronous.commit_pending()
        results["async_total"].append(time.perf_counter() - start)

        if distributed.is_writer():
            state = {"model": model.module.state_dict() if hasattr(model, "module") else model.state_dict(), "optim": optimizer.state_dict()}
            target = root / f"torch_save{repeat}.pt"
            start = time.perf_counter()
            torch.save(state, target)
            results["torch_save"].append(time.perf_counter() - start)
            target.unlink()
            start = time.perf_counter()
            with open(target, "wb") as handle:
                torch.save(state, handle)
                handle.flush()
                os.fsync(handle.fileno())
            results["torch_save_fsync"].append(time.perf_counter() - start)
            target.unlink()

            dd_target = root / f"dd{repeat}.bin"
            megabytes = max(1, size // 2**20)
            start = time.perf_counter()
            subprocess.run(
                ["dd", "if=/dev/zero", f"of={dd_target}", "bs=1M", f"count={megabytes}", "conv=fsync"],
                check=True, capture_output=True,
            )
            results["dd"].append(megabytes * 2**20 / (time.perf_counter() - start))
            dd_target.unlink()
            shutil.rmtree(run_dir)
        distributed.barrier()

    if distributed.is_writer():
        Path(args.out).write_text(json.dumps(results))
    idist.finalize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument("--nproc", type=int, default=2, help="gloo ranks (default 2)")
    parser.add_argument("--dir", default=None, help="directory on the file system to measure (default: a temporary one)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    with tempfile.TemporaryDirectory(prefix="dist-bnn-checkpoint-cost-", dir=args.dir) as scratch:
        out = Path(scratch) / "result.json"
        torchrun(Path(__file__), args.nproc, [
            "--worker", "--out", str(out), "--repeats", str(args.repeats), "--dir", scratch,
        ])
        r = json.loads(out.read_text())
    size = median(r["bytes"])
    sync, torch_save, torch_fsync = median(r["sync"]), median(r["torch_save"]), median(r["torch_save_fsync"])
    blocked, dd = median(r["async_blocked"]), median(r["dd"])
    print(f"machine: {machine()}")
    print(f"state: {size / 1e6:.1f} MB on disk per checkpoint, {args.nproc} gloo ranks, medians of {args.repeats}")
    print(f"dist_bnn synchronous save:     {sync:.3f} s  ({size / sync / 1e6:.0f} MB/s)")
    print(f"torch.save from rank 0:        {torch_save:.3f} s   -> ratio {sync / torch_save:.2f}  (target <= 1.1)")
    print(f"torch.save + fsync:            {torch_fsync:.3f} s   -> ratio {sync / torch_fsync:.2f}")
    print(f"dd conv=fsync bandwidth:       {dd / 1e6:.0f} MB/s -> save reaches {size / sync / dd:.0%} of it (target >= 50%)")
    print(f"dist_bnn async save, blocked:  {blocked:.3f} s   -> ratio to synchronous {blocked / sync:.3f}  (target <= 0.10)")
    print(f"dist_bnn async save, to commit: {median(r['async_total']):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
