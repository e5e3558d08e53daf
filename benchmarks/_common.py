"""Helpers shared by the benchmark scripts: medians, the machine's description, torchrun."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
DIGITS_CONFIG = REPO / "configs" / "digits_sghmc.yaml"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    """Return one line naming the CPU count, the platform and the torch version."""
    return (
        f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def torchrun(script: Path, nproc: int, args: Sequence[str], env: dict[str, str] | None = None) -> None:
    """Run ``script`` under torchrun on loopback with ``nproc`` processes; raise if it fails."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        str(script), *args,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {result.returncode}:\n{result.stderr[-4000:]}")
