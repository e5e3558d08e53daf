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


def bare_manifest(epoch: int, world_size: int):  # type: ignore[no-untyped-def]
    """Return a checkpoint manifest with progress only, for benchmarks that save bare state."""
    from dist_bnn.checkpoint.manifest import Manifest

    return Manifest(
        epoch=epoch, iteration=epoch, epoch_length=1, num_epochs=10**6, world_size=world_size,
        sample_files=[], files={}, samples={}, wandb_run_id="benchmark", config_hash="", config={}, versions={},
    )
