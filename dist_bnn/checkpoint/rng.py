"""Per-rank RNG states (torch, CUDA, numpy, python) as tensors and plain numbers.

Each rank stores its own file: DCP keeps a single copy of any key that every rank saves, so
per-rank values under one shared key would be silently lost. Only tensors, ints, floats and
strings are stored, so the files load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_bnn.checkpoint.files import torch_save_atomic


def rank_rng_path(checkpoint_dir: Path, rank: int) -> Path:
    return checkpoint_dir / "rng" / f"rank_{rank:05d}.pt"


def derive_seed(seed: int, *stream: int) -> int:
    """Return a 32-bit seed for the RNG stream ``stream`` of run seed ``seed``.

    Streams built this way are statistically independent of each other, unlike ``seed + rank``
    whose neighbouring runs share streams.
    """
    return int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0])


def seed_rank_rngs(seed: int, rank: int, epoch: int | None = None) -> None:
    """Seed the global torch, numpy and python RNGs of this rank from ``(seed, rank)``, or from
    ``(seed, rank, epoch)`` when a resume on another world size cannot restore them."""
    rank_seed = derive_seed(seed, 2, rank) if epoch is None else derive_seed(seed, 3, rank, epoch)
    torch.manual_seed(rank_seed)
    np.random.seed(rank_seed)
    random.seed(rank_seed)


def capture_rng_state() -> dict[str, Any]:
    """Return the global RNG states of this process as tensors and plain numbers."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global RNG states from :func:`capture_rng_state` output."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate(
        (
            python_state["version"],
            tuple(int(v) for v in python_state["internal"].tolist()),
            python_state["gauss_next"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rank_rng(checkpoint_dir: Path, rank: int, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write this rank's RNG states and ``extra`` per-rank tensors (stored under ``"extra"``)."""
    path = rank_rng_path(checkpoint_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = capture_rng_state()
    state["extra"] = dict(extra or {})
    torch_save_atomic(path, state)


def load_rank_rng(checkpoint_dir: Path, rank: int) -> dict[str, Any]:
    return torch.load(rank_rng_path(checkpoint_dir, rank), weights_only=True)
