"""Digits table: cSGHMC and SGLD Bayesian model averages against the MAP baseline.

For every method and seed it runs the product as a user would, ``dist-bnn train CONFIG`` and then
``dist-bnn evaluate RUN_DIR``, and reads ``RUN_DIR/eval/metrics.json``. It prints one Markdown
row per method with the mean and standard deviation over seeds of the test accuracy, NLL, ECE
(15 equal-width bins) and Brier score of the Bayesian model average. The MAP baseline's only
sample is its final weights, so its row is that single model. A second table gives NLL and ECE
per seed; ``training.seed`` also draws the train/validation/test split.

    python benchmarks/digits.py                  # plain processes, seeds 0 1 2
    python benchmarks/digits.py --nproc 2        # each job on 2 gloo ranks under torchrun

Every method trains for the epochs its config sets (100 in the shipped configs). Run
directories go under ``--out`` (default: a new temporary directory), W&B is disabled.
Exit code 0 when every job succeeded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dist_bnn.testing import job_environment

REPO = Path(__file__).resolve().parents[1]
# (row label, config file) in table order.
METHODS = (
    ("MAP (SGHMC at T=0)", "digits_map.yaml"),
    ("SGLD", "digits_sgld.yaml"),
    ("cSGHMC", "digits_csghmc.yaml"),
)
METRICS = ("accuracy", "nll", "ece", "brier")
# Upper bound for one train or evaluate launch; a launch that takes longer has hung.
LAUNCH_TIMEOUT_S = 600


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


def train_and_evaluate(config: str, seed: int, run_dir: Path, nproc: int | None, env: dict[str, str]) -> dict:
    """Train one method with one seed, evaluate it, and return its metrics.json plus the
    training time in seconds."""
    log = run_dir.parent / f"{run_dir.name}.log"
    start = time.perf_counter()
    run_logged(
        dist_bnn_command(
            nproc, "train", str(REPO / "configs" / config), f"run.dir={run_dir}",
            f"training.seed={seed}", "run.resume=false", "wandb.mode=disabled",
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="values of training.seed")
    parser.add_argument("--nproc", type=int, default=None, help="ranks per job under torchrun (default: a plain process)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the run directories and logs")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="dist_bnn_digits_"))
    out.mkdir(parents=True, exist_ok=True)
    env = job_environment(out)

    results: dict[str, list[dict]] = {}
    start = time.perf_counter()
    try:
        for label, config in METHODS:
            for seed in args.seeds:
                run_dir = out / f"{Path(config).stem}_seed{seed}"
                results.setdefault(label, []).append(train_and_evaluate(config, seed, run_dir, args.nproc, env))
                print(f"{label} seed {seed}: done after {time.perf_counter() - start:.0f} s", file=sys.stderr)
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        print(f"digits benchmark failed: {err}", file=sys.stderr)
        return 1

    ranks = "1 plain process" if args.nproc is None else f"{args.nproc} gloo ranks"
    print(f"digits test split, {len(args.seeds)} seed(s) {args.seeds}, {ranks} per job, run directories in {out}")
    print_table(results)
    print()
    print_per_seed(results, args.seeds)
    print(f"total {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
