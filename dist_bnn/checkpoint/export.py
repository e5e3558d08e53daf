"""Exporting a checkpoint's model weights as one plain file (``.pt`` or ``.safetensors``)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from dist_bnn.checkpoint.files import write_atomic
from dist_bnn.checkpoint.verify import InvalidCheckpoint, verify_checkpoint
from dist_bnn.errors import UsageError

SUFFIXES = (".pt", ".safetensors")


def load_all(checkpoint: Path) -> dict[str, Any]:
    """Load every tensor and value of a DCP checkpoint in this process, with no process group.

    Call only on a verified checkpoint: DCP's ``.metadata`` is a pickle.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as scratch:
        target = Path(scratch) / "state.pt"
        dcp_to_torch_save(checkpoint, target)
        return torch.load(target, weights_only=True)


def export_model(checkpoint: Path, out: Path) -> dict[str, torch.Tensor]:
    """Write the model tensors of ``checkpoint`` to ``out`` and check the file on disk.

    Parameter names are the plain module names (DCP stores no ``module.`` prefix). The file is
    read back after writing and every tensor compared with the checkpoint's.

    Returns:
        The exported tensors.

    Raises:
        UsageError: for an unsupported suffix or a checkpoint that does not verify.
        RuntimeError: if the written file does not read back equal; it is removed then.
    """
    if out.suffix not in SUFFIXES:
        raise UsageError(f"output {out} has suffix {out.suffix!r}; use one of {', '.join(SUFFIXES)}")
    try:
        verify_checkpoint(checkpoint, checkpoint.parent.parent / "samples")
    except InvalidCheckpoint as err:
        raise UsageError(f"checkpoint {checkpoint} does not verify: {err}") from None

    tensors = {name: tensor.contiguous() for name, tensor in load_all(checkpoint)["model"].items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: _write(tensors, tmp, out.suffix))

    written = _read(out)
    if written.keys() != tensors.keys() or any(not torch.equal(written[k], tensors[k]) for k in tensors):
        out.unlink(missing_ok=True)
        raise RuntimeError(f"{out} did not read back equal to {checkpoint}; removed it")
    return tensors


def _write(tensors: dict[str, torch.Tensor], path: Path, suffix: str) -> None:
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)


def _read(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, weights_only=True)
