"""Rank facts, the single "am I the writer" rule and small collectives over ``ignite.distributed``.

Every helper here works with and without a process group: with none (a plain process started
without a launcher) the world size is 1 and the collectives return their input.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ignite.distributed as idist
import torch

# Variables that torchrun, `accelerate launch` and SLURM-with-torchrun set in every worker.
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_launcher() -> bool:
    """Return whether this process was started by a launcher that set RANK and WORLD_SIZE."""
    return all(name in os.environ for name in _LAUNCHER_VARIABLES)


def resolve_backend(requested: str) -> str | None:
    """Map ``distributed.backend`` to the backend handed to ``idist.initialize``.

    A plain process started without a launcher gets no process group (``None``) for ``auto``:
    a one-rank group would only cost a fixed TCP port. Under a launcher ``auto`` picks NCCL when
    CUDA is available and gloo otherwise.
    """
    if requested == "auto":
        if not launched_by_launcher():
            return None
        return "nccl" if torch.cuda.is_available() else "gloo"
    return requested


def rank() -> int:
    return idist.get_rank()


def world_size() -> int:
    return idist.get_world_size()


def is_writer() -> bool:
    """Return whether this rank writes run-level files (manifest, samples, metrics, W&B)."""
    return idist.get_rank() == 0


def barrier() -> None:
    """Wait until every rank arrives. Every rank must call this."""
    if idist.get_world_size() > 1:
        idist.barrier()


def broadcast_json(value: Any) -> Any:
    """Send rank 0's JSON-serialisable ``value`` to every rank. Every rank must call this.

    Ranks other than 0 may pass ``None``. JSON rather than pickle keeps what crosses ranks plain
    data.
    """
    if idist.get_world_size() == 1:
        return value
    text = json.dumps(value) if is_writer() else ""
    text = idist.broadcast(text, src=0, safe_mode=True)
    return json.loads(text)


def all_gather_ints(values: list[int]) -> list[list[int]]:
    """Gather a list of ints of the same length from every rank. Every rank must call this.

    Returns:
        One list per rank, in rank order.
    """
    local = torch.tensor(values, dtype=torch.int64, device=idist.device())
    if idist.get_world_size() == 1:
        return [values]
    gathered = idist.all_gather(local.unsqueeze(0))
    return [row.tolist() for row in gathered.cpu()]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks and return the result. Every rank must call this."""
    if idist.get_world_size() == 1:
        return tensor
    return idist.all_reduce(tensor, op="SUM")


def all_gather_json(value: Any) -> list[Any]:
    """Gather a JSON-serialisable value from every rank, in rank order. Every rank must call
    this."""
    if idist.get_world_size() == 1:
        return [value]
    return [json.loads(text) for text in idist.all_gather(json.dumps(value))]
