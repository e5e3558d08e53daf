"""Verification of a committed checkpoint before anything in it is loaded.

DCP's ``.metadata`` is a pickle. It is read only after its sha256 matched the manifest, which
rank 0 wrote from the files it had just saved, so a file planted or swapped in a checkpoint
directory is rejected before it can be unpickled.
"""

from __future__ import annotations

from pathlib import Path

from dist_bnn.checkpoint.files import file_digest
from dist_bnn.checkpoint.manifest import MANIFEST_NAME, Manifest, ManifestError, read_manifest

DCP_METADATA = ".metadata"


class InvalidCheckpoint(Exception):
    """A checkpoint that fails verification; the message names the file and the reason."""


def verify_checkpoint(path: Path, samples_dir: Path) -> Manifest:
    """Check the manifest schema and the size and sha256 of every file it lists.

    Args:
        path: the checkpoint directory.
        samples_dir: the run's ``samples/`` directory, holding the files of ``sample_files``.

    Returns:
        The verified manifest.

    Raises:
        InvalidCheckpoint: naming the first file that is missing, has another size or digest,
            or the manifest problem.
    """
    try:
        manifest = read_manifest(path)
    except ManifestError as err:
        raise InvalidCheckpoint(str(err)) from None
    if DCP_METADATA not in manifest.files:
        raise InvalidCheckpoint(f"{path / MANIFEST_NAME} lists no {DCP_METADATA} file")
    for relative, expected in sorted(manifest.files.items()):
        _check_file(path / relative, expected)
    for name in manifest.sample_files:
        _check_file(samples_dir / name, manifest.samples[name])
    return manifest


def _check_file(path: Path, expected: dict) -> None:
    if not path.is_file():
        raise InvalidCheckpoint(f"{path} is missing")
    actual = file_digest(path)
    if actual["size"] != expected["size"]:
        raise InvalidCheckpoint(
            f"{path} has {actual['size']} bytes, expected {expected['size']} (truncated or replaced)"
        )
    if actual["sha256"] != expected["sha256"]:
        raise InvalidCheckpoint(f"{path} has sha256 {actual['sha256'][:16]}..., expected {expected['sha256'][:16]}...")
