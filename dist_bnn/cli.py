"""Command line: ``dist-bnn train CONFIG.yaml [key=value ...]``.

Exit codes: 0 success (including "run complete, nothing to do"), 2 invalid input (bad config,
a run directory that cannot be resumed as asked), 1 any other failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from dist_bnn import __version__
from dist_bnn.config import ConfigError, load_config
from dist_bnn.errors import UsageError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

logger = logging.getLogger("dist_bnn.cli")


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
    train.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level of rank 0; other ranks log warnings and errors only (default: INFO)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return _train(args.args, args.log_level)
    raise AssertionError(f"unhandled command {args.command}")


def _train(raw: list[str], log_level: str) -> int:
    config_path = None
    overrides = list(raw)
    if overrides and "=" not in overrides[0]:
        config_path = overrides.pop(0)
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as err:
        print(f"dist-bnn: error: {err}", file=sys.stderr)
        return EXIT_USAGE

    # Imported here so that `dist-bnn --help` and config errors stay fast.
    from dist_bnn.logs import setup_logging
    from dist_bnn.training.trainer import train

    # Launchers set RANK and WORLD_SIZE before the process group exists, so logging set up now
    # covers the start too. run_on_rank sets it up again with the group's rank.
    setup_logging(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), log_level)

    try:
        train(cfg, log_level)
    except UsageError as err:
        logger.error("%s", err)
        print(f"dist-bnn: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
