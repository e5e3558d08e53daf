"""Evaluation cost: peak memory with 50 against 5 samples, and throughput against plain forward
passes of the same samples over the same data, in the same run.

Two digits runs of an MLP with 1.1 M parameters (4.4 MB per sample file) write 5 and 50
posterior samples. Then, per repetition:

- ``dist-bnn evaluate RUN_DIR`` runs as a plain process on each; its peak resident memory comes
  from ``os.wait4``;
- in this process, the Bayesian model average over the 50 samples (``evaluate_bma``, the
  function ``dist-bnn evaluate`` and the trainer use) is timed against a loop that only loads
  each sample and runs the forward pass over the same test batches.

    python benchmarks/eval_cost.py      # 5 repetitions, about 2 min

Targets: peak memory(50) <= 1.1 x peak memory(5); throughput >= 0.9 x plain forward passes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DIGITS_CONFIG, machine, median  # noqa: E402

from dist_bnn.testing import job_environment  # noqa: E402

WIDE = ["model.hidden_sizes=[1024,1024]", "checkpoint.every_epochs=100", "samples.start_epoch=1", "wandb.mode=disabled"]


def train(run_dir: Path, num_samples: int, env: dict[str, str]) -> None:
    command = [
        sys.executable, "-m", "dist_bnn", "train", str(DIGITS_CONFIG), *WIDE,
        f"training.num_epochs={num_samples}", f"run.dir={run_dir}",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"training {run_dir} failed:\n{result.stderr[-4000:]}")


def peak_rss_kib(run_dir: Path, env: dict[str, str]) -> int:
    """Peak resident memory in KiB of ``dist-bnn evaluate RUN_DIR`` as a plain process."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dist_bnn", "evaluate", str(run_dir)], env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"dist-bnn evaluate {run_dir} failed with exit code {process.returncode}")
    return usage.ru_maxrss


def time_bma_and_plain(run_dir: Path) -> tuple[float, float]:
    """Seconds of ``evaluate_bma`` and of plain forward passes over the same samples and data."""
    import torch

    from dist_bnn.config import load_config
    from dist_bnn.data import build_eval_loader, load_splits
    from dist_bnn.evaluation.bma import evaluate_bma
    from dist_bnn.likelihoods import build_likelihood
    from dist_bnn.models import build_model

    cfg = load_config(DIGITS_CONFIG, [*WIDE, f"run.dir={run_dir}"])
    splits = load_splits(cfg.data, cfg.training.seed)
    loader = build_eval_loader(splits.test, cfg.data.eval_batch_size, 1, 0)
    model = build_model(cfg, splits)
    likelihood = build_likelihood(cfg, splits)
    paths = sorted((run_dir / "samples").glob("sample_*.pt"))
    device = torch.device("cpu")

    def plain_passes() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.eval()
            batches = [features for features, _ in loader]
            for path in paths:
                model.load_state_dict(torch.load(path, weights_only=True))
                for features in batches:
                    model(features)
        return time.perf_counter() - start

    plain_passes()  # warm-up: page cache and first-call costs would count against the first timed side
    start = time.perf_counter()
    evaluate_bma(model, paths, loader, device, likelihood)
    bma = time.perf_counter() - start
    return bma, plain_passes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument("--few", type=int, default=5, help="samples of the small run (default 5)")
    parser.add_argument("--many", type=int, default=50, help="samples of the large run (default 50)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="dist-bnn-eval-cost-") as scratch:
        root = Path(scratch)
        env = job_environment(root)
        runs = {n: root / f"run{n}" for n in (args.few, args.many)}
        for n, run_dir in runs.items():
            train(run_dir, n, env)
        peaks: dict[int, list[int]] = {n: [] for n in runs}
        bma, plain = [], []
        for _ in range(args.repeats):
            for n, run_dir in runs.items():
                peaks[n].append(peak_rss_kib(run_dir, env))
            seconds = time_bma_and_plain(runs[args.many])
            bma.append(seconds[0])
            plain.append(seconds[1])

    few, many = median(peaks[args.few]), median(peaks[args.many])
    print(f"machine: {machine()}")
    print(f"MLP [1024, 1024] on digits (359 test examples), medians of {args.repeats}")
    print(f"peak RSS of dist-bnn evaluate, {args.few} samples:  {few / 1024:.0f} MiB")
    print(f"peak RSS of dist-bnn evaluate, {args.many} samples: {many / 1024:.0f} MiB -> ratio {many / few:.3f}  (target <= 1.1)")
    print(f"plain forward passes of {args.many} samples: {median(plain):.3f} s")
    print(f"Bayesian model average of {args.many} samples: {median(bma):.3f} s -> throughput ratio {median(plain) / median(bma):.3f}  (target >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
