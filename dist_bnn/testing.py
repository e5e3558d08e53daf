"""Helpers for tests and the fault-injection harness: kill a launched job, compare two runs.

Not used by training. They read run directories as files, with no process group.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import torch

from dist_bnn.checkpoint.export import load_all
from dist_bnn.checkpoint.manager import checkpoint_dirs
from dist_bnn.training.wandb_offline import history_rows, offline_runs


def job_environment(root: Path) -> dict[str, str]:
    """Return the environment for a launched job: W&B files under ``root``, gloo on loopback,
    one thread per rank, and none of a surrounding launcher's rank variables."""
    values = dict(os.environ)
    wandb_home = root / "wandb-home"
    values.update(
        WANDB_SILENT="true",
        WANDB_CACHE_DIR=str(wandb_home / "cache"),
        WANDB_CONFIG_DIR=str(wandb_home / "config"),
        WANDB_DATA_DIR=str(wandb_home / "data"),
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "WANDB_MODE"):
        values.pop(name, None)
    return values


def kill_tree(root_pid: int) -> None:
    """SIGKILL ``root_pid`` and every process descended from it (Linux ``/proc``).

    torchrun starts its workers in sessions of their own, so killing the launcher's process
    group would leave the ranks running. The tree is collected before the first kill, because
    a killed parent's children are re-parented and no longer found.
    """
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, queue = [], [root_pid]
    while queue:
        pid = queue.pop()
        tree.append(pid)
        queue.extend(children.get(pid, []))
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def sample_hashes(run_dir: Path) -> dict[str, str]:
    """Return ``{file name: sha256}`` of the run's sample files."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted((run_dir / "samples").glob("*.pt"))
    }


def load_dcp(checkpoint: Path) -> dict[str, Any]:
    """Load every tensor and value of a DCP checkpoint in this process, with no process group."""
    return load_all(checkpoint)


def first_difference(left: Any, right: Any, where: str = "state") -> str | None:
    """Describe the first place where two nested dicts/lists of tensors and values differ
    bitwise, or return ``None`` if they are equal."""
    if type(left) is not type(right):
        return f"{where}: {type(left).__name__} vs {type(right).__name__}"
    if isinstance(left, dict):
        if left.keys() != right.keys():
            return f"{where}: keys differ ({sorted(set(left) ^ set(right))})"
        pairs = [(left[key], right[key], f"{where}.{key}") for key in left]
    elif isinstance(left, (list, tuple)):
        if len(left) != len(right):
            return f"{where}: lengths {len(left)} vs {len(right)}"
        pairs = [(a, b, f"{where}[{i}]") for i, (a, b) in enumerate(zip(left, right))]
    elif isinstance(left, torch.Tensor):
        if left.dtype != right.dtype or left.shape != right.shape:
            return f"{where}: {left.dtype}{tuple(left.shape)} vs {right.dtype}{tuple(right.shape)}"
        return None if torch.equal(left, right) else f"{where}: values differ"
    else:
        return None if left == right else f"{where}: {left!r} != {right!r}"
    for a, b, inner in pairs:
        found = first_difference(a, b, inner)
        if found:
            return found
    return None


def wandb_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Return the W&B offline history rows of every launch of the run, without ``_`` keys."""
    rows = [row for run in offline_runs(run_dir / "wandb") for row in history_rows(run)]
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows]


def compare_runs(reference: Path, candidate: Path) -> str | None:
    """Return the first difference between two finished runs of the same job, or ``None``.

    Compared: sample files (sha256), the final checkpoint's model and optimizer tensors,
    ``metrics.jsonl`` (each epoch exactly once) and the W&B offline history (each epoch once).
    """
    expected, actual = sample_hashes(reference), sample_hashes(candidate)
    if expected != actual:
        differing = sorted(name for name in set(expected) | set(actual) if expected.get(name) != actual.get(name))
        return f"sample files differ: {differing}"

    final = [checkpoint_dirs(run)[-1] for run in (reference, candidate)]
    if final[0].name != final[1].name:
        return f"final checkpoints differ: {final[0].name} vs {final[1].name}"
    found = first_difference(load_dcp(final[0]), load_dcp(final[1]), "checkpoint")
    if found:
        return found

    metrics = [(run / "metrics.jsonl").read_text() for run in (reference, candidate)]
    if metrics[0] != metrics[1]:
        epochs = [json.loads(line)["epoch"] for line in metrics[1].splitlines()]
        return f"metrics.jsonl differs; candidate epochs: {epochs}"

    rows = [wandb_rows(run) for run in (reference, candidate)]
    if rows[0] != rows[1]:
        return f"W&B history differs; candidate epochs: {[row.get('epoch') for row in rows[1]]}"
    return None
