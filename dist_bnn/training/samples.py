"""Posterior-sample files ``RUN_DIR/samples/sample_{epoch:04d}.pt``, named by the true epoch."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from dist_bnn import distributed
from dist_bnn.checkpoint.files import file_digest, torch_save_atomic
from dist_bnn.errors import SampleConflictError

logger = logging.getLogger(__name__)

SAMPLES_DIR = "samples"
_SAMPLE_PATTERN = re.compile(r"^sample_(\d{4,})\.pt$")


def sample_name(epoch: int) -> str:
    return f"sample_{epoch:04d}.pt"


def sample_epoch(name: str) -> int | None:
    """Return the epoch in a sample file name, or ``None`` if ``name`` is not a sample file."""
    match = _SAMPLE_PATTERN.match(name)
    return int(match.group(1)) if match else None


def unwrap(model: nn.Module) -> nn.Module:
    """Return the module inside a DDP (or DataParallel) wrapper, so names carry no ``module.``."""
    return getattr(model, "module", model)


def tensor_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return a CPU copy of the unwrapped model's state dict, tensors only."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in unwrap(model).state_dict().items()}


class SampleStore:
    """The run's posterior samples and the list of sample files committed so far.

    Which epochs are samples is decided by :func:`dist_bnn.config.is_sample_epoch`.

    Build on every rank: every rank keeps the same list, and only the writer touches files.
    """

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir / SAMPLES_DIR
        self.files: list[str] = []
        # Size and sha256 per file, known on rank 0 only; committed in the manifest.
        self.digests: dict[str, dict] = {}

    def paths(self) -> list[Path]:
        return [self.dir / name for name in self.files]

    def write(self, epoch: int, model: nn.Module) -> None:
        """Record the weights after ``epoch`` as a sample; rank 0 writes the file.

        Raises:
            SampleConflictError: if the file exists with other tensors. A file with the same
                tensors (an epoch that a resume regenerated) is kept as it is.
        """
        name = sample_name(epoch)
        if name in self.files:
            raise SampleConflictError(f"sample {name} was already recorded in this run")
        if distributed.is_writer():
            path = self.dir / name
            self._write_file(path, tensor_state(model))
            self.digests[name] = file_digest(path)
        self.files.append(name)

    def _write_file(self, path: Path, state: dict[str, torch.Tensor]) -> None:
        if path.exists():
            existing = torch.load(path, weights_only=True, map_location="cpu")
            if existing.keys() == state.keys() and all(torch.equal(existing[k], state[k]) for k in state):
                logger.info("sample %s already exists with identical tensors; kept", path)
                return
            raise SampleConflictError(
                f"sample {path} already exists with different tensors; refusing to overwrite a "
                f"posterior sample. Move it away or use a new run.dir"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        torch_save_atomic(path, state)
        logger.debug("wrote sample %s", path)

    def committed_digests(self) -> dict[str, dict]:
        """Return the digest of every recorded sample file, for the manifest. Rank 0 only."""
        return {name: self.digests[name] for name in self.files}

    def restore(self, files: list[str], digests: dict[str, dict], epoch: int) -> None:
        """Adopt a checkpoint's committed sample list and tidy the directory. Every rank calls
        this; only rank 0 touches files.

        Sample files written after the checkpoint at ``epoch`` were never committed: the resumed
        run regenerates them bitwise, so they are removed (with a log line) before it does.

        Raises:
            FileNotFoundError: if a committed sample file is missing.
        """
        self.files = list(files)
        self.digests = dict(digests)
        if not distributed.is_writer():
            return
        missing = [name for name in self.files if not (self.dir / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"committed sample files are missing from {self.dir}: {', '.join(missing)}; "
                f"restore them or start a new run.dir"
            )
        self.remove_uncommitted(after_epoch=epoch)

    def remove_uncommitted(self, after_epoch: int) -> None:
        """Delete sample files newer than ``after_epoch`` and temporary files of interrupted
        writes. Only rank 0 calls this."""
        if not self.dir.is_dir():
            return
        for path in sorted(self.dir.iterdir()):
            if path.name.startswith(".") and ".tmp-" in path.name:
                logger.info("removing %s left by an interrupted write", path)
                path.unlink()
                continue
            epoch = sample_epoch(path.name)
            if epoch is not None and epoch > after_epoch and path.name not in self.files:
                logger.info(
                    "removing sample %s, newer than the resumed checkpoint of epoch %d (the "
                    "resumed run writes it again)",
                    path,
                    after_epoch,
                )
                path.unlink()
