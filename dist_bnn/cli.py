"""Command line: ``dist-bnn train``, ``evaluate``, ``inspect`` and ``export`` (see ``--help``).

Exit codes:
    0   success, including "run complete, nothing to do"
    1   any other failure
    2   invalid input: a bad config, or a run directory that cannot be resumed as asked or has
        no committed samples to evaluate
    75  preempted by a signal after saving a checkpoint; relaunch to resume
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from dist_bnn import __version__
from dist_bnn.config import ConfigError, load_config
from dist_bnn.errors import (
    PREEMPTED_EXIT_CODE,
    CheckpointSaveError,
    Preempted,
    ReplicaMismatchError,
    SampleConflictError,
    UsageError,
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dist-bnn",
        description="Data-parallel SG-MCMC for Bayesian neural networks that resumes exactly.",
    )
    parser.add_argument("--version", action="version", version=f"dist-bnn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train",
        help="train a BNN, or resume the run in run.dir from its newest checkpoint",
        description="Train a BNN, or resume the run in run.dir from its newest checkpoint. "
        "Launch under torchrun or accelerate for several processes.",
    )
    train.add_argument(
        "args",
        nargs="*",
        metavar="[CONFIG.yaml] [key=value ...]",
        help="an optional YAML config file followed by dotted overrides, e.g. sampler.lr=0.01",
    )
    _add_log_level(train)

    evaluate = commands.add_parser(
        "evaluate",
        help="compute test metrics and plots of the Bayesian model average of a run's samples",
        description="Evaluate the Bayesian model average of the posterior samples committed by "
        "the newest checkpoint of RUN_DIR on its test split, and write RUN_DIR/eval/metrics.json "
        "and metrics_vs_samples.png, plus reliability.png for classification and predictive.png "
        "for regression with one input. Launch under torchrun to split the samples over several "
        "processes.",
    )
    evaluate.add_argument("run_dir", metavar="RUN_DIR", help="run.dir of a `dist-bnn train` run")
    evaluate.add_argument(
        "--split",
        choices=("test", "validation"),
        default="test",
        help="split to evaluate on (default: test). validation writes into RUN_DIR/eval_validation "
        "instead of RUN_DIR/eval, for choosing settings without looking at the test split",
    )
    _add_log_level(evaluate)

    inspect = commands.add_parser(
        "inspect",
        help="list a run directory's checkpoints and what relaunching the run would do",
        description="List every checkpoint of RUN_DIR (committed, invalid with the reason, "
        "partial) with epoch, iteration, world size, samples and size, and say what the next "
        "`dist-bnn train` launch on it would do. Needs no process group and no GPU; writes "
        "nothing.",
    )
    inspect.add_argument("run_dir", metavar="RUN_DIR", help="run.dir of a `dist-bnn train` run")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")

    export = commands.add_parser(
        "export",
        help="write a checkpoint's model weights to one .pt or .safetensors file",
        description="Write the model weights of CHECKPOINT (a directory under RUN_DIR/checkpoints) "
        "to OUT, as .pt or .safetensors by its suffix, with plain parameter names. The file is "
        "read back and compared with the checkpoint; the exit code is non-zero whenever no "
        "verified file was written. Needs no process group and no GPU.",
    )
    export.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint directory")
    export.add_argument("out", metavar="OUT", help="output file, ending in .pt or .safetensors")
    return parser


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level of rank 0; other ranks log warnings and errors only (default: INFO)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return _train(args.args, args.log_level)
    if args.command == "evaluate":
        return _evaluate(Path(args.run_dir), args.split, args.log_level)
    if args.command == "inspect":
        return _inspect(Path(args.run_dir), args.json)
    if args.command == "export":
        return _export(Path(args.checkpoint), Path(args.out))
    raise AssertionError(f"unhandled command {args.command}")


def _train(raw: list[str], log_level: str) -> int:
    config_path = None
    overrides = list(raw)
    if overrides and "=" not in overrides[0]:
        config_path = overrides.pop(0)
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as err:
        return _report(err, EXIT_USAGE)

    # Imported here so that `dist-bnn --help` and config errors stay fast.
    from dist_bnn.training.trainer import train

    _setup_logging(log_level)
    return _run(lambda: train(cfg, log_level))


def _evaluate(run_dir: Path, split: str, log_level: str) -> int:
    from dist_bnn.evaluation.run_evaluation import evaluate_run

    _setup_logging(log_level)
    return _run(lambda: evaluate_run(run_dir, log_level, split))


def _inspect(run_dir: Path, as_json: bool) -> int:
    from dist_bnn.checkpoint.inspect import format_report, inspect_run
    from dist_bnn.training.run_dir import RUN_FILE
    from dist_bnn.training.samples import SAMPLES_DIR

    run_file = run_dir / RUN_FILE
    try:
        num_epochs = json.loads(run_file.read_text())["config"]["training"]["num_epochs"]
    except FileNotFoundError:
        return _report(UsageError(f"{run_file} not found, so {run_dir} is not a dist_bnn run directory"), EXIT_USAGE)
    except (OSError, ValueError, KeyError, TypeError) as err:
        return _report(UsageError(f"{run_file} is unreadable ({err})"), EXIT_USAGE)
    report = inspect_run(run_dir, run_dir / SAMPLES_DIR, num_epochs)
    print(json.dumps(report.to_json(), indent=2) if as_json else format_report(report))
    return EXIT_OK


def _export(checkpoint: Path, out: Path) -> int:
    from dist_bnn.checkpoint.export import export_model

    if not checkpoint.is_dir():
        return _report(UsageError(f"checkpoint directory {checkpoint} not found"), EXIT_USAGE)
    try:
        tensors = export_model(checkpoint, out)
    except UsageError as err:
        return _report(err, EXIT_USAGE)
    except (OSError, RuntimeError) as err:
        return _report(err, EXIT_FAILURE)
    size = out.stat().st_size
    print(f"wrote {len(tensors)} tensors ({size} bytes) to {out}; read back equal to {checkpoint}")
    return EXIT_OK


def _setup_logging(log_level: str) -> None:
    from dist_bnn.logs import setup_logging

    # Launchers set RANK and WORLD_SIZE before the process group exists, so logging set up now
    # covers the start too. The job sets it up again with the group's rank.
    setup_logging(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), log_level)


def _run(job: Callable[[], None]) -> int:
    """Run ``job`` and map the failures a user can act on to an exit code and one message."""
    try:
        job()
    except (UsageError, ConfigError, NotImplementedError) as err:
        # ConfigError here comes from data loading: a UCI directory, file or split not found.
        return _report(err, EXIT_USAGE)
    except (CheckpointSaveError, SampleConflictError, ReplicaMismatchError) as err:
        return _report(err, EXIT_FAILURE)
    except Preempted as err:
        return _report(err, PREEMPTED_EXIT_CODE)
    return EXIT_OK


def _report(err: Exception, code: int) -> int:
    print(f"dist-bnn: error: {err}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
