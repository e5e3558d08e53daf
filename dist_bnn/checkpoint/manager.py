"""Saving, finding and loading checkpoints through torch.distributed.checkpoint (DCP).

Layout of one checkpoint, ``RUN_DIR/checkpoints/epoch0006-iter000000120/``::

    .metadata              DCP's index of the shards, written by rank 0 at the end of dcp.save
    __<rank>_0.distcp      DCP shards of model and optimizer (replicated tensors deduplicated)
    rng/rank_<rank>.pt     each rank's RNG states (tensors and plain numbers)
    manifest.json          written last by rank 0: the commit marker

Commit rule: every rank writes into ``checkpoints/.partial-<name>/``. When ``dcp.save`` returns
on rank 0, every rank's shards are written. Rank 0 then writes the manifest, renames the
directory to ``<name>`` and fsyncs ``checkpoints/``. A directory without a valid manifest is
never loaded.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from dist_bnn import distributed
from dist_bnn.checkpoint.files import fsync_dir
from dist_bnn.checkpoint.manifest import Manifest, ManifestError, read_manifest, write_manifest
from dist_bnn.checkpoint.rng import load_rank_rng, save_rank_rng

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
PARTIAL_PREFIX = ".partial-"


@dataclass
class CommittedCheckpoint:
    path: Path
    manifest: Manifest


def checkpoint_name(epoch: int, iteration: int) -> str:
    return f"epoch{epoch:04d}-iter{iteration:09d}"


def find_committed(run_dir: Path) -> list[CommittedCheckpoint]:
    """Return the committed checkpoints of ``run_dir``, oldest first.

    A directory whose manifest is missing or invalid is skipped with a warning naming the reason.
    """
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.iterdir()):
        if not path.is_dir() or path.name.startswith("."):
            continue
        try:
            found.append(CommittedCheckpoint(path, read_manifest(path)))
        except ManifestError as err:
            logger.warning("skipping checkpoint %s: %s", path, err)
    found.sort(key=lambda c: (c.manifest.iteration, c.manifest.epoch))
    return found


def remove_partial(run_dir: Path) -> None:
    """Delete checkpoint directories left half-written by a crash. Only rank 0 calls this."""
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return
    for path in sorted(root.glob(PARTIAL_PREFIX + "*")):
        logger.info("removing partial checkpoint %s left by an interrupted save", path)
        shutil.rmtree(path)


def _no_process_group() -> bool:
    # A plain process without a launcher has no process group; telling DCP so avoids its
    # "assuming single process" warning on every save.
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def save_checkpoint(
    run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, manifest: Manifest
) -> Path:
    """Write and commit one checkpoint. Every rank must call this.

    Args:
        run_dir: the run directory; the checkpoint goes under ``run_dir/checkpoints``.
        model: the (possibly DDP-wrapped) model; DCP stores plain parameter names.
        optimizer: the sampler, whose state includes the shared noise generator.
        manifest: progress to commit; only rank 0's copy is written.

    Returns:
        The committed checkpoint directory.
    """
    start = time.perf_counter()
    name = checkpoint_name(manifest.epoch, manifest.iteration)
    root = run_dir / CHECKPOINTS_DIR
    final = root / name
    partial = root / f"{PARTIAL_PREFIX}{name}"
    if final.exists():
        # Only a resume from an older checkpoint than the newest could lead here, and resume
        # always picks the newest.
        raise FileExistsError(f"checkpoint {final} already exists; refusing to overwrite it")

    partial.mkdir(parents=True, exist_ok=True)
    save_rank_rng(partial, distributed.rank())
    dcp.save(_state(model, optimizer), checkpoint_id=partial, no_dist=_no_process_group())

    # dcp.save ends with rank 0 gathering every rank's write results and writing .metadata, so
    # when it returns on rank 0 all shards and RNG files exist.
    if distributed.is_writer():
        write_manifest(partial, manifest)
        partial.rename(final)
        fsync_dir(root)
    distributed.barrier()
    logger.info(
        "saved checkpoint %s (epoch %d, iteration %d) in %.2f s",
        final,
        manifest.epoch,
        manifest.iteration,
        time.perf_counter() - start,
    )
    return final


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Load model and optimizer state in place from ``path``. Every rank must call this.

    Returns:
        This rank's stored RNG states, to restore with
        :func:`dist_bnn.checkpoint.rng.restore_rng_state` right before training continues.
    """
    start = time.perf_counter()
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=path, no_dist=_no_process_group())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_state = load_rank_rng(path, distributed.rank())
    logger.info("loaded checkpoint %s in %.2f s", path, time.perf_counter() - start)
    return rng_state
