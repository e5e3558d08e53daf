"""Durable file writes: write to a temporary name, fsync, rename, fsync the directory."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename or a new file) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a sibling temporary path, then rename it to ``path`` durably.

    A reader sees either no file or the complete file, never a partial one.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    write_atomic(path, lambda tmp: tmp.write_text(text))


def torch_save_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def file_digest(path: Path) -> dict[str, int | str]:
    """Return ``{"size": bytes, "sha256": hex digest}`` of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}
