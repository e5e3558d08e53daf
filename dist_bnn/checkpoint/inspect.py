"""Reading a run directory's checkpoints without a process group, for ``dist-bnn inspect``.

Nothing here writes, and nothing unpickles: manifests are JSON and files are only hashed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_bnn.checkpoint.manager import (
    CHECKPOINTS_DIR,
    INVALID_PREFIX,
    PARTIAL_PREFIX,
    REMOVING_PREFIX,
    checkpoint_dirs,
)
from dist_bnn.checkpoint.manifest import Manifest, ManifestError, read_manifest
from dist_bnn.checkpoint.verify import InvalidCheckpoint, verify_checkpoint


@dataclass
class CheckpointReport:
    """One directory under ``checkpoints/`` and what a resume would make of it."""

    name: str
    status: str
    """``committed`` (verifies), ``invalid`` (has a manifest but fails verification),
    ``partial`` (an interrupted save), ``set aside`` (moved away as invalid by a resume) or
    ``removing`` (an interrupted deletion)."""
    reason: str | None = None
    """Reason the checkpoint fails verification, for ``invalid``."""
    epoch: int | None = None
    iteration: int | None = None
    world_size: int | None = None
    num_samples: int | None = None
    size_bytes: int = 0


@dataclass
class RunReport:
    """Every checkpoint of a run directory, oldest first, and the next launch's action."""

    run_dir: str
    checkpoints: list[CheckpointReport] = field(default_factory=list)
    resume_from: str | None = None
    """Checkpoint a relaunch would load: the newest that verifies."""
    next_action: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def inspect_run(run_dir: Path, samples_dir: Path, num_epochs: int | None) -> RunReport:
    """Describe the checkpoints of ``run_dir`` and what relaunching the run would do.

    Args:
        run_dir: the run directory.
        samples_dir: its ``samples/`` directory, for verifying the committed sample files.
        num_epochs: ``training.num_epochs`` a relaunch would use (the stored one), or ``None``.
    """
    report = RunReport(run_dir=str(run_dir))
    for path in _all_checkpoint_dirs(run_dir):
        report.checkpoints.append(_describe(path, samples_dir))
    report.checkpoints.sort(key=lambda c: (c.iteration is None, c.iteration or 0, c.name))

    valid = [c for c in report.checkpoints if c.status == "committed"]
    newer_invalid = [c for c in report.checkpoints if c.status == "invalid"]
    if not valid:
        report.next_action = (
            "stop with an error: checkpoints exist but none verifies" if newer_invalid else "start from scratch"
        )
        return report
    newest = valid[-1]
    report.resume_from = newest.name
    manifest = read_manifest(run_dir / CHECKPOINTS_DIR / newest.name)
    if manifest.at_epoch_end and num_epochs is not None and manifest.epoch == num_epochs:
        report.next_action = f"nothing: run complete (epoch {manifest.epoch} of {num_epochs})"
    elif num_epochs is not None and manifest.epoch > num_epochs:
        report.next_action = (
            f"stop with an error: {newest.name} is past training.num_epochs={num_epochs}"
        )
    elif manifest.at_epoch_end:
        report.next_action = f"resume from {newest.name} at epoch {manifest.epoch + 1}"
    else:
        consumed = manifest.engine_iteration - manifest.epoch * manifest.epoch_length
        report.next_action = (
            f"resume from {newest.name} inside epoch {manifest.epoch + 1} at batch {consumed + 1}"
        )
    skipped = [c.name for c in newer_invalid if (c.iteration or 0) > (newest.iteration or 0)]
    if skipped:
        report.next_action += f", after setting aside {', '.join(skipped)}"
    return report


def _all_checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / CHECKPOINTS_DIR
    hidden = sorted(p for p in root.glob(".*") if p.is_dir()) if root.is_dir() else []
    return checkpoint_dirs(run_dir) + hidden


def _describe(path: Path, samples_dir: Path) -> CheckpointReport:
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    for prefix, status in ((PARTIAL_PREFIX, "partial"), (INVALID_PREFIX, "set aside"), (REMOVING_PREFIX, "removing")):
        if path.name.startswith(prefix):
            return CheckpointReport(name=path.name, status=status, size_bytes=size)
    report = CheckpointReport(name=path.name, status="committed", size_bytes=size)
    try:
        manifest: Manifest = read_manifest(path)
    except ManifestError as err:
        report.status, report.reason = "invalid", str(err)
        return report
    report.epoch, report.iteration = manifest.epoch, manifest.iteration
    report.world_size, report.num_samples = manifest.world_size, len(manifest.sample_files)
    try:
        verify_checkpoint(path, samples_dir)
    except InvalidCheckpoint as err:
        report.status, report.reason = "invalid", str(err)
    return report


def format_report(report: RunReport) -> str:
    """Render a report as a fixed-width table for a terminal."""
    lines = [f"run directory: {report.run_dir}", ""]
    header = f"{'checkpoint':<34} {'status':<10} {'epoch':>5} {'iteration':>10} {'world':>5} {'samples':>7} {'MiB':>8}"
    lines += [header, "-" * len(header)]
    for c in report.checkpoints:
        lines.append(
            f"{c.name:<34} {c.status:<10} {_cell(c.epoch):>5} {_cell(c.iteration):>10} "
            f"{_cell(c.world_size):>5} {_cell(c.num_samples):>7} {c.size_bytes / 2**20:>8.2f}"
        )
        if c.reason:
            lines.append(f"    reason: {c.reason}")
    if not report.checkpoints:
        lines.append("(no checkpoints)")
    lines += ["", f"next launch: {report.next_action}"]
    return "\n".join(lines)


def _cell(value: int | None) -> str:
    return "-" if value is None else str(value)
