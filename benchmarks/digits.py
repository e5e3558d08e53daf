"""Digits table: cSGHMC and SGLD Bayesian model averages against the MAP baseline.

For every method and seed it runs the product as a user would, ``dist-bnn train CONFIG`` and then
``dist-bnn evaluate RUN_DIR``, and reads ``RUN_DIR/eval/metrics.json``. It prints one Markdown
row per method with the mean and standard deviation over seeds of the test accuracy, NLL, ECE
(15 equal-width bins) and Brier score of the Bayesian model average. The MAP baseline's only
sample is its final weights, so its row is that single model. A second table gives NLL and ECE
per seed, and a third the paired difference of each method from MAP: its mean over seeds with
the standard error, and on how many seeds the method is lower. ``training.seed`` also draws the
train/validation/test split.

    python benchmarks/digits.py                  # plain processes, seeds 3 to 9
    python benchmarks/digits.py --nproc 2        # each job on 2 gloo ranks under torchrun

The default seeds leave out 0, 1 and 2, on which the configs' step sizes and temperatures were
chosen by validation NLL. Every method trains for the epochs its config sets (300 in the
shipped configs). ``--jobs`` jobs run at once, each rank on one thread. Run directories go under
``--out`` (default: a new temporary directory), W&B is disabled. Exit code 0 when every job
succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dist_bnn.testing import job_environment

REPO = Path(__file__).resolve().parents[1]
# (row label, config file) in table order.
BASELINE = "MAP (SGHMC at T=0)"
METHODS = (
    (BASELINE, "digits_map.yaml"),
    ("SGLD", "digits_sgld.yaml"),
    ("cSGHMC", "digits_csghmc.yaml"),
)
METRICS = ("accuracy", "nll", "ece", "brier")
# Seeds the configs were tuned on; the default seeds leave them out.
TUNING_SEEDS = (0, 1, 2)
DEFAULT_SEEDS = (3, 4, 5, 6, 7, 8, 9)
# Upper bound for one train or evaluate launch; a launch that takes longer has hung.
LAUNCH_TIMEOUT_S = 900


def dist_bnn_command(nproc: int | None, *args: str) -> list[str]:
    """Return the command line of ``dist-bnn ARGS``: a plain process, or torchrun with
    ``nproc`` workers (``--standalone`` binds its rendezvous to a free port on localhost)."""
    cli = ["-m", "dist_bnn", *args]
    if nproc is None:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *cli]


def run_logged(command: list[str], env: dict[str, str], log: Path) -> None:
    with open(log, "ab") as output:
        result = subprocess.run(command, env=env, stdout=output, stderr=output, timeout=LAUNCH_TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[-4:])} failed with exit code {result.returncode}; see {log}")


def train_and_evaluate(
    config: str, seed: int, run_dir: Path, nproc: int | None, env: dict[str, str], overrides: list[str]
) -> dict:
    """Train one method with one seed, evaluate it, and return its metrics.json plus the
    training time in seconds. ``overrides`` (KEY=VALUE) apply after the config's own values."""
    log = run_dir.parent / f"{run_dir.name}.log"
    start = time.perf_counter()
    run_logged(
        dist_bnn_command(
            nproc, "train", str(REPO / "configs" / config), f"run.dir={run_dir}",
            f"training.seed={seed}", "run.resume=false", "wandb.mode=disabled", *overrides,
        ),
        env, log,
    )
    train_seconds = time.perf_counter() - start
    run_logged(dist_bnn_command(nproc, "evaluate", str(run_dir)), env, log)
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    return {**metrics, "train_seconds": train_seconds}


def mean_and_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def print_table(results: dict[str, list[dict]]) -> None:
    print("| method | samples | accuracy | NLL | ECE | Brier | train s |")
    print("|---|---|---|---|---|---|---|")
    for label, runs in results.items():
        cells = [mean_and_std([run[key] for run in runs]) for key in METRICS]
        samples = "/".join(sorted({str(run["num_samples"]) for run in runs}))
        seconds = statistics.mean(run["train_seconds"] for run in runs)
        print(f"| {label} | {samples} | {' | '.join(cells)} | {seconds:.0f} |")


def print_per_seed(results: dict[str, list[dict]], seeds: list[int]) -> None:
    """Print NLL and ECE per seed: the seed also draws the data split, so the methods are best
    compared seed by seed."""
    labels = list(results)
    print("| seed | " + " | ".join(f"{label} NLL / ECE" for label in labels) + " |")
    print("|---" * (len(labels) + 1) + "|")
    for index, seed in enumerate(seeds):
        cells = [f"{results[label][index]['nll']:.4f} / {results[label][index]['ece']:.4f}" for label in labels]
        print(f"| {seed} | " + " | ".join(cells) + " |")


def print_paired(results: dict[str, list[dict]]) -> None:
    """Print each method's per-seed difference from the baseline in NLL and ECE: mean ± standard
    error over seeds, and on how many seeds the method's value is lower."""
    print(f"| method | NLL - {BASELINE} NLL | seeds lower | ECE - {BASELINE} ECE | seeds lower |")
    print("|---|---|---|---|---|")
    baseline = results[BASELINE]
    for label, runs in results.items():
        if label == BASELINE:
            continue
        cells = []
        for key in ("nll", "ece"):
            differences = [run[key] - base[key] for run, base in zip(runs, baseline)]
            cells.append(mean_and_standard_error(differences))
            cells.append(f"{sum(d < 0 for d in differences)}/{len(differences)}")
        print(f"| {label} | {' | '.join(cells)} |")


def mean_and_standard_error(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:+.4f}"
    return f"{statistics.mean(values):+.4f} ± {statistics.stdev(values) / math.sqrt(len(values)):.4f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS), help="values of training.seed")
    parser.add_argument("--nproc", type=int, default=None, help="ranks per job under torchrun (default: a plain process)")
    parser.add_argument("--jobs", type=int, default=None, help="jobs run at once (default: CPU cores / ranks per job)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the run directories and logs")
    parser.add_argument(
        "--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
        help="config overrides for every training job, for example training.num_epochs=10",
    )
    args = parser.parse_args()
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs={args.jobs} is invalid; give at least 1")
    jobs = args.jobs or max(1, (os.cpu_count() or 1) // (args.nproc or 1))
    tuned_on = sorted(set(args.seeds) & set(TUNING_SEEDS))
    if tuned_on:
        print(
            f"note: the configs' step sizes and temperatures were tuned on seeds {tuned_on}, so the "
            f"test numbers of those seeds are optimistic",
            file=sys.stderr,
        )
    out = args.out or Path(tempfile.mkdtemp(prefix="dist_bnn_digits_"))
    out.mkdir(parents=True, exist_ok=True)
    env = job_environment(out)

    start = time.perf_counter()
    tasks = [(label, config, seed) for label, config in METHODS for seed in args.seeds]

    def run_task(task: tuple[str, str, int]) -> dict:
        label, config, seed = task
        metrics = train_and_evaluate(config, seed, out / f"{Path(config).stem}_seed{seed}", args.nproc, env, args.overrides)
        print(f"{label} seed {seed}: done after {time.perf_counter() - start:.0f} s", file=sys.stderr)
        return metrics

    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            finished = list(pool.map(run_task, tasks))
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        print(f"digits benchmark failed: {err}", file=sys.stderr)
        return 1
    results: dict[str, list[dict]] = {}
    for (label, _, _), metrics in zip(tasks, finished):
        results.setdefault(label, []).append(metrics)

    ranks = "1 plain process" if args.nproc is None else f"{args.nproc} gloo ranks"
    print(f"digits test split, {len(args.seeds)} seed(s) {args.seeds}, {ranks} per job, {jobs} job(s) at once, run directories in {out}")
    print_table(results)
    print()
    print_per_seed(results, args.seeds)
    print()
    print_paired(results)
    print(f"total {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
