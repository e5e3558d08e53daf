"""UCI regression benchmark: an SGHMC BNN next to the published MC-dropout results.

Trains a one-hidden-layer BNN (50 units, inferred Gaussian noise) with SGHMC on each split of
each data set through `dist-bnn train` and `dist-bnn evaluate`. Both are called in this
process, on the CPU, with no process group. The script then prints the mean ± standard error
over splits of the test RMSE and test log-likelihood, in the target's units, beside Gal &
Ghahramani's MC-dropout numbers.

Every run takes about the same number of SGHMC steps (``--steps``), whatever the size of
its set: the number of epochs is that budget over the steps per epoch. The first third of the
epochs is burn-in; ``--samples`` posterior samples are then taken at equal intervals.

The defaults are a quick check (3 splits per set). The published protocol uses all 20, here
with two runs at a time:

    .venv/bin/python benchmarks/uci.py --splits 20 --workers 2

DATA_DIR contains one directory per set in the UCI split format (data.txt, index_*.txt).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# Set before torch and tqdm are imported, and inherited by the workers. Ignite's per-iteration
# progress bar would flood the output, and a 50-unit network gains nothing from more threads.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from dist_bnn.config import DataConfig, load_config  # noqa: E402
from dist_bnn.data import load_splits  # noqa: E402
from dist_bnn.evaluation.run_evaluation import evaluate_run  # noqa: E402
from dist_bnn.training.trainer import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "uci"
DATASETS = ("concrete", "energy", "wine", "yacht")

# MC dropout, Gal & Ghahramani (ICML 2016), Table 1, as quoted in the data directory's
# README: (RMSE mean, standard error, test log-likelihood mean, standard error).
MC_DROPOUT = {
    "concrete": (5.23, 0.53, -3.04, 0.09),
    "energy": (1.66, 0.19, -1.99, 0.09),
    "wine": (0.62, 0.04, -0.93, 0.06),
    "yacht": (1.11, 0.38, -1.55, 0.12),
}

# Settings shared by every set, as `dist-bnn train` overrides. No validation split: the
# protocol trains on the whole training split of each split.
COMMON_SETTINGS = (
    "model.hidden_sizes=[50]",
    "model.activation=relu",
    "likelihood.noise=inferred",
    "data.val_fraction=0",
    "training.validate_every_epochs=0",
    "sampler.name=sghmc",
    "sampler.momentum=0.9",
    "sampler.temperature=1.0",
    "sampler.prior_std=1.0",
    "wandb.mode=disabled",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", nargs="?", type=Path, default=DEFAULT_DATA_DIR,
                        help=f"directory with one UCI-format folder per set (default: {DEFAULT_DATA_DIR})")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS,
                        help="sets to run (default: all four)")
    parser.add_argument("--splits", type=int, default=3,
                        help="number of splits per set, the first ones (default: 3; 20 is the full protocol)")
    parser.add_argument("--steps", type=int, default=10000,
                        help="SGHMC steps per run, rounded up to whole epochs (default: 10000)")
    parser.add_argument("--samples", type=int, default=50,
                        help="posterior samples per run, after a burn-in of a third of the epochs (default: 50)")
    parser.add_argument("--lr", type=float, default=0.0015, help="SGHMC step size, sampler.lr (default: 0.0015)")
    parser.add_argument("--batch-size", type=int, default=32, help="mini-batch size (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="training.seed of every run (default: 0)")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs trained at once, each in its own process on one thread (default: 1)")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="keep the run directories here (default: a temporary directory)")
    parser.add_argument("--json", type=Path, default=None, help="also write every split's metrics here")
    args = parser.parse_args(argv)
    if args.splits < 1:
        parser.error(f"--splits must be at least 1, got {args.splits}")
    if args.steps < 1 or args.samples < 1 or args.workers < 1:
        parser.error(
            f"--steps, --samples and --workers must be at least 1, got {args.steps}, {args.samples} "
            f"and {args.workers}"
        )
    return args


def schedule(args: argparse.Namespace, root: Path, split: int) -> tuple[int, int, int]:
    """Return ``(epochs, first sampled epoch, epochs between samples)`` for ``args.steps``."""
    splits = load_splits(DataConfig(name="uci", root=str(root), split=split, val_fraction=0.0), args.seed)
    steps_per_epoch = max(len(splits.train) // args.batch_size, 1)
    epochs = max(math.ceil(args.steps / steps_per_epoch), 3)
    burn_in = epochs // 3
    thinning = max((epochs - burn_in) // args.samples, 1)
    # The last epoch is a sample: count back from it so exactly the requested samples fit.
    start = max(epochs - thinning * (args.samples - 1), burn_in + 1)
    return epochs, start, thinning


def run_split(args: argparse.Namespace, dataset: str, split: int, runs_dir: Path) -> dict[str, float]:
    """Train and evaluate one split; return its ``rmse``, ``test_ll``, ``num_samples`` and
    ``seconds``."""
    start = time.perf_counter()
    run_dir = runs_dir / dataset / f"split{split:02d}"
    epochs, first_sample, thinning = schedule(args, args.data_dir / dataset, split)
    overrides = [
        *COMMON_SETTINGS,
        f"run.dir={run_dir}",
        "data.name=uci",
        f"data.root={args.data_dir / dataset}",
        f"data.split={split}",
        f"data.batch_size={args.batch_size}",
        f"sampler.lr={args.lr}",
        f"training.num_epochs={epochs}",
        f"training.seed={args.seed}",
        f"samples.start_epoch={first_sample}",
        f"samples.every_epochs={thinning}",
        f"checkpoint.every_epochs={epochs}",
    ]
    train(load_config(None, overrides), log_level="WARNING")
    evaluate_run(run_dir, log_level="WARNING")
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    row = {key: metrics[key] for key in ("rmse", "test_ll", "num_samples")}
    row["seconds"] = time.perf_counter() - start
    return row


def mean_and_standard_error(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, statistics.stdev(values) / math.sqrt(len(values))


def format_table(results: dict[str, list[dict[str, float]]]) -> str:
    """Return a Markdown table of our mean ± standard error beside MC dropout's."""
    lines = [
        "| set | splits | RMSE, SGHMC (ours) | RMSE, MC dropout | test LL, SGHMC (ours) | test LL, MC dropout |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for dataset, rows in results.items():
        rmse = mean_and_standard_error([row["rmse"] for row in rows])
        test_ll = mean_and_standard_error([row["test_ll"] for row in rows])
        ref = MC_DROPOUT[dataset]
        lines.append(
            f"| {dataset} | {len(rows)} | {rmse[0]:.2f} ± {rmse[1]:.2f} | {ref[0]:.2f} ± {ref[1]:.2f} "
            f"| {test_ll[0]:.2f} ± {test_ll[1]:.2f} | {ref[2]:.2f} ± {ref[3]:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for dataset in args.datasets:
        if not (args.data_dir / dataset / "data.txt").is_file():
            print(f"uci.py: error: {args.data_dir / dataset / 'data.txt'} not found; pass the "
                  f"directory that contains {', '.join(args.datasets)} as DATA_DIR", file=sys.stderr)
            return 2

    start = time.perf_counter()
    jobs = [(dataset, split) for dataset in args.datasets for split in range(args.splits)]
    with tempfile.TemporaryDirectory(prefix="uci-benchmark-") as scratch:
        runs_dir = args.runs_dir or Path(scratch)
        # Spawned workers: a forked copy of a process that has run torch is not safe to use.
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_split, args, dataset, split, runs_dir) for dataset, split in jobs]
            results: dict[str, list[dict[str, float]]] = {dataset: [] for dataset in args.datasets}
            for (dataset, split), future in zip(jobs, futures):
                row = future.result()
                results[dataset].append(row)
                print(f"{dataset} split {split}: rmse={row['rmse']:.4f} test_ll={row['test_ll']:.4f} "
                      f"samples={row['num_samples']} ({row['seconds']:.1f} s)", flush=True)
    print(f"\n{args.splits} split(s) per set in {time.perf_counter() - start:.0f} s\n")
    print(format_table(results))
    if args.json is not None:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
