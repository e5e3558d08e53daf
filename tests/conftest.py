"""Helpers that launch the real command line, alone or under torchrun, on gloo and loopback."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest

from dist_bnn.testing import first_difference, kill_tree, load_dcp, sample_hashes  # noqa: F401
from dist_bnn.testing import job_environment as make_env

REPO = Path(__file__).resolve().parents[1]
DIGITS_CONFIG = REPO / "configs" / "digits_sghmc.yaml"
sys.path.insert(0, str(Path(__file__).resolve().parent))

# A small job that still exercises every path: 18 steps of 64 examples per epoch.
SMALL_JOB = ("model.hidden_sizes=[32]", "data.batch_size=64")

# Upper bound for one launch on the 2-core CI machine, so a hang fails instead of blocking.
LAUNCH_TIMEOUT_S = 240


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return make_env(tmp_path)


def train_command(args: Sequence[str], nproc: int | None = None, launcher_args: Sequence[str] = ()) -> list[str]:
    """Command line of ``dist-bnn train``: a plain process, or torchrun with ``nproc`` workers.

    ``--standalone`` makes torchrun bind its rendezvous to an OS-assigned port on localhost.
    """
    cli = ["-m", "dist_bnn", "train", *args]
    if nproc is None:
        return [sys.executable, *cli]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(nproc), *launcher_args, *cli,
    ]


def run(command: Sequence[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, env=env, cwd=cwd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S
    )


def run_ok(command: Sequence[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = run(command, env, cwd)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-6000:]}"
    return result


def run_and_kill(
    command: Sequence[str], env: dict[str, str], ready: Callable[[], bool], what: str, log: Path
) -> None:
    """Start ``command`` in its own session and SIGKILL all of it once ``ready()`` holds.

    Its output goes to ``log`` (an unread pipe could fill up and stall the job).
    """
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        try:
            while not ready():
                if process.poll() is not None:
                    tail = log.read_text(errors="replace")[-4000:]
                    raise AssertionError(f"job ended (exit {process.returncode}) before {what}:\n{tail}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {what} within {LAUNCH_TIMEOUT_S} s")
                time.sleep(0.01)
        finally:
            kill_tree(process.pid)
            process.wait()


def committed(run_dir: Path, epoch: int) -> bool:
    """Return whether the checkpoint of ``epoch`` has its manifest, whatever its iteration."""
    return any((run_dir / "checkpoints").glob(f"epoch{epoch:04d}-iter*/manifest.json"))


def newest_checkpoint(run_dir: Path) -> Path:
    return sorted(p for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith("."))[-1]


def assert_same_tree(left: Any, right: Any) -> None:
    """Assert two nested dicts/lists of tensors and plain values are bitwise equal."""
    difference = first_difference(left, right)
    assert difference is None, difference
