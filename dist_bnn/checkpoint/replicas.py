"""Check that data-parallel replicas hold bitwise-identical parameters."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
from torch import nn

from dist_bnn import distributed
from dist_bnn.errors import ReplicaMismatchError

logger = logging.getLogger(__name__)


def parameter_fingerprint(model: nn.Module) -> int:
    """Return a 63-bit hash of every parameter's name, shape, dtype and bytes."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        tensor = param.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def tree_fingerprint(tree: Any) -> int:
    """Return a 63-bit hash of every tensor in a nested dict/list, with its key path, shape and
    dtype. Other values (hyper-parameters, parameter names) are ignored."""
    digest = hashlib.sha256()

    def visit(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key in sorted(node, key=str):
                visit(node[key], f"{path}.{key}")
        elif isinstance(node, (list, tuple)):
            for i, item in enumerate(node):
                visit(item, f"{path}[{i}]")
        elif isinstance(node, torch.Tensor):
            tensor = node.detach().to("cpu").contiguous()
            digest.update(f"{path}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())

    visit(tree, "")
    return int.from_bytes(digest.digest()[:8], "little") >> 1


def check_replicas(model: nn.Module) -> None:
    """Raise unless every rank's parameters are identical. Every rank must call this.

    Costs one all-gather of one integer per rank plus hashing the parameters once on the CPU.

    Raises:
        ReplicaMismatchError: on every rank, listing the ranks that differ from rank 0.
    """
    fingerprints = [row[0] for row in distributed.all_gather_ints([parameter_fingerprint(model)])]
    differing = [rank for rank, value in enumerate(fingerprints) if value != fingerprints[0]]
    if differing:
        raise ReplicaMismatchError(
            f"model replicas differ: ranks {differing} hold other parameters than rank 0. The "
            f"Langevin noise or the gradients were not identical on every rank (a sampler built "
            f"with a per-rank seed, or a step taken outside DDP); the chain is invalid from the "
            f"last checkpoint on"
        )
    logger.debug("replicas identical on all %d ranks (fingerprint %016x)", len(fingerprints), fingerprints[0])
