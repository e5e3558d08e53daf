"""Inspecting and preparing the run directory before training (rank 0 only).

``RUN_DIR/run.json`` records the run's identity: the W&B run id and the configuration that
decides the chain's trajectory. It is written once, by the first launch, after every check
passed, so a rejected launch writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_bnn.checkpoint import manager
from dist_bnn.checkpoint.files import write_json_atomic
from dist_bnn.checkpoint.manifest import Manifest
from dist_bnn.config import Config, to_dict, trajectory_values
from dist_bnn.training.samples import SAMPLES_DIR

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"


@dataclass
class RunPlan:
    """Plan of this launch (fresh start, resume or nothing to do), decided by rank 0 and
    broadcast to every rank. Deciding writes nothing but the clean-up of interrupted saves."""

    run_id: str = ""
    resume_path: str | None = None
    resume_manifest: Manifest | None = None
    complete: bool = False
    new_run: bool = False
    """Whether ``run.json`` is still to be written, once the job is built without error."""
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["resume_manifest"] = self.resume_manifest.to_json() if self.resume_manifest else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunPlan":
        manifest = data.pop("resume_manifest")
        plan = cls(**data)
        if manifest is not None:
            plan.resume_manifest = Manifest.from_json(manifest, source=str(plan.resume_path))
        return plan


def plan_run(run_dir: Path, cfg: Config, world_size: int) -> RunPlan:
    """Decide between a fresh start, a resume and "run complete"; prepare the directory.

    Problems that the user must resolve are returned in ``RunPlan.error`` rather than raised,
    so that rank 0 can broadcast them and every rank stops together.
    """
    try:
        return _plan_run(run_dir, cfg, world_size)
    except _PlanError as err:
        return RunPlan(error=str(err))


class _PlanError(Exception):
    pass


def _plan_run(run_dir: Path, cfg: Config, world_size: int) -> RunPlan:
    identity = _read_identity(run_dir, cfg)
    directories = manager.checkpoint_dirs(run_dir)
    if directories and not cfg.run.resume:
        raise _PlanError(
            f"run.dir={run_dir} already contains {len(directories)} checkpoint(s) and run.resume=false; "
            f"set run.resume=true to continue that run or choose a new run.dir"
        )

    plan = RunPlan(run_id=identity["wandb_run_id"] if identity else secrets.token_hex(4))
    latest, invalid = manager.select_checkpoint(run_dir, run_dir / SAMPLES_DIR) if directories else (None, [])
    if directories and latest is None:
        reasons = "; ".join(f"{path.name}: {reason}" for path, reason in invalid)
        raise _PlanError(
            f"run.dir={run_dir} contains {len(directories)} checkpoint(s) but none verifies ({reasons}). "
            f"Restore the damaged files, or move the checkpoints away to start the run again"
        )
    if latest is not None:
        plan.resume_path = str(latest.path)
        plan.resume_manifest = latest.manifest
        plan.complete = latest.manifest.at_epoch_end and latest.manifest.epoch == cfg.training.num_epochs
        if not plan.complete:  # a finished run needs no particular world size
            _check_resumable(latest, cfg, world_size)
        if latest.manifest.wandb_run_id != plan.run_id:
            raise _PlanError(
                f"checkpoint {latest.path} belongs to W&B run {latest.manifest.wandb_run_id} but "
                f"{run_dir / RUN_FILE} names {plan.run_id}; the run directory mixes two runs"
            )

    plan.new_run = identity is None
    if not plan.complete:
        manager.remove_partial(run_dir)
        # The resumed run writes new checkpoints under the names of the invalid newer ones.
        for path, _ in invalid:
            manager.set_aside(path)
    return plan


def _read_identity(run_dir: Path, cfg: Config) -> dict[str, Any] | None:
    path = run_dir / RUN_FILE
    if not path.exists():
        leftovers = [p for p in (run_dir / SAMPLES_DIR, run_dir / manager.CHECKPOINTS_DIR) if p.exists()]
        if leftovers:
            raise _PlanError(
                f"run.dir={run_dir} contains {', '.join(p.name for p in leftovers)} but no {RUN_FILE}, "
                f"so it was not created by dist_bnn; choose an empty or new run.dir"
            )
        return None
    try:
        identity = json.loads(path.read_text())
        stored = identity["trajectory"]
        identity["wandb_run_id"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _PlanError(f"{path} is unreadable ({err}); restore it or choose a new run.dir") from None
    current = trajectory_values(cfg)
    # An older run.json lacks the keys that later versions added. Each new key defaults to the
    # behaviour before it existed, so the stored run had the default value.
    defaults = trajectory_values(Config())
    stored = {**{key: defaults[key] for key in current if key not in stored and key in defaults}, **stored}
    changed = [
        f"{key}: {stored.get(key)!r} -> {current.get(key)!r}"
        for key in sorted(set(stored) | set(current))
        if stored.get(key) != current.get(key)
    ]
    if changed:
        raise _PlanError(
            f"run.dir={run_dir} contains a run with another configuration; these keys differ from "
            f"the stored run ({', '.join(changed)}). Relaunch with the original values (only "
            f"training.num_epochs, checkpoint.*, wandb.* and distributed.* may change) or choose "
            f"a new run.dir"
        )
    return identity


def write_identity(run_dir: Path, cfg: Config, run_id: str) -> None:
    """Write ``run.json`` for a new run. Only rank 0 calls this, once the job is built."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        run_dir / RUN_FILE,
        {"wandb_run_id": run_id, "trajectory": trajectory_values(cfg), "config": to_dict(cfg)},
    )
    logger.info("created run %s (W&B run id %s)", run_dir, run_id)


def _check_resumable(latest: manager.CommittedCheckpoint, cfg: Config, world_size: int) -> None:
    manifest = latest.manifest
    if manifest.world_size != world_size and not manifest.at_epoch_end:
        raise _PlanError(
            f"checkpoint {latest.path} was saved inside epoch {manifest.epoch + 1} (after a "
            f"preemption) by {manifest.world_size} rank(s); this launch has {world_size}. "
            f"Relaunch with {manifest.world_size} processes to finish that epoch, since a change "
            f"of world size is possible at epoch boundaries only"
        )
    # A checkpoint inside an epoch needs that epoch to be part of the run.
    started = -(-manifest.engine_iteration // manifest.epoch_length)
    if cfg.training.num_epochs < started:
        raise _PlanError(
            f"training.num_epochs={cfg.training.num_epochs} is smaller than the {started} "
            f"epochs already trained in {latest.path}; use training.num_epochs >= {started}"
        )
