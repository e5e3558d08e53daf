"""The checkpoint manifest: a small JSON file that rank 0 writes last, committing a checkpoint.

A checkpoint directory counts only once its ``manifest.json`` exists and parses; until then it
is a partial write that is never loaded.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_bnn.checkpoint.files import write_json_atomic

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class ManifestError(ValueError):
    """A manifest that is missing, not JSON or does not match the schema."""


@dataclass
class Manifest:
    """Progress of a run at one checkpoint; everything a resume needs besides the DCP shards."""

    epoch: int
    """Number of completed epochs."""
    iteration: int
    """Number of completed iterations (optimizer steps), counted from the start of the run."""
    epoch_length: int
    """Iterations per epoch at the checkpoint's world size and batch size."""
    num_epochs: int
    """``training.num_epochs`` of the run that wrote the checkpoint."""
    world_size: int
    """Number of ranks that wrote the checkpoint."""
    sample_files: list[str]
    """Posterior-sample file names under ``samples/``, oldest first, committed with it."""
    files: dict[str, dict[str, Any]]
    """Size and sha256 of every file of the checkpoint directory but this manifest, keyed by
    path relative to it: ``{"rng/rank_00000.pt": {"size": 1234, "sha256": "..."}}``."""
    samples: dict[str, dict[str, Any]]
    """Size and sha256 of every file of ``sample_files``, keyed by file name."""
    wandb_run_id: str
    """W&B run id shared by every launch of this run."""
    config_hash: str
    """sha256 of the canonical JSON of ``config``."""
    config: dict[str, Any]
    """The full resolved configuration."""
    versions: dict[str, str]
    """Versions of torch, pytorch-ignite and dist_bnn that wrote it."""
    iteration_offset: int = 0
    """``iteration`` minus Ignite's own iteration counter. Nonzero after a resume on another
    world size changed ``epoch_length``: the run's iteration count then keeps growing from
    where it was, so W&B steps never go back."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Metrics of the last completed epoch (training loss, validation accuracy and NLL)."""
    final_metrics: dict[str, float] | None = None
    """Test metrics of the Bayesian model average, set on the checkpoint of the last epoch."""
    created: str = ""
    """UTC time of writing, ISO 8601."""
    format_version: int = FORMAT_VERSION
    """Version of this schema."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def engine_iteration(self) -> int:
        """Ignite's iteration counter at the checkpoint."""
        return self.iteration - self.iteration_offset

    @property
    def at_epoch_end(self) -> bool:
        return self.engine_iteration == self.epoch * self.epoch_length

    @classmethod
    def from_json(cls, data: Any, source: str) -> "Manifest":
        """Validate ``data`` against the schema and build a manifest.

        Raises:
            ManifestError: naming ``source`` and the first missing or mistyped field.
        """
        if not isinstance(data, dict):
            raise ManifestError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestError(
                f"{source}: format_version {version!r} is not supported (expected {FORMAT_VERSION})"
            )
        known = {f.name: f for f in dataclasses.fields(cls)}
        for name, spec in known.items():
            required = spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
            if required and name not in data:
                raise ManifestError(f"{source}: missing field {name!r}")
        for name, kind in _FIELD_TYPES.items():
            if name in data and not isinstance(data[name], kind):
                raise ManifestError(
                    f"{source}: field {name!r} must be {_type_names(kind)}, got {data[name]!r}"
                )
        if any(not isinstance(name, str) for name in data["sample_files"]):
            raise ManifestError(f"{source}: sample_files must be a list of file names")
        if sorted(data["samples"]) != sorted(data["sample_files"]):
            raise ManifestError(f"{source}: samples must hold a digest for each of sample_files")
        for table in ("files", "samples"):
            for name, entry in data[table].items():
                if not _is_digest(entry):
                    raise ManifestError(
                        f"{source}: {table}[{name!r}] must be {{'size': int, 'sha256': str}}, got {entry!r}"
                    )
        return cls(**{name: data[name] for name in known if name in data})


_FIELD_TYPES: dict[str, Any] = {
    "epoch": int,
    "iteration": int,
    "epoch_length": int,
    "iteration_offset": int,
    "num_epochs": int,
    "world_size": int,
    "sample_files": list,
    "files": dict,
    "samples": dict,
    "wandb_run_id": str,
    "config_hash": str,
    "config": dict,
    "versions": dict,
    "metrics": dict,
    "final_metrics": (dict, type(None)),
    "created": str,
}


def _is_digest(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get("sha256"), str)
        and len(entry["sha256"]) == 64
    )


def _type_names(kind: Any) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def write_manifest(checkpoint_dir: Path, manifest: Manifest) -> None:
    """Write ``manifest.json`` durably into ``checkpoint_dir``. Only rank 0 calls this."""
    write_json_atomic(checkpoint_dir / MANIFEST_NAME, manifest.to_json())


def read_manifest(checkpoint_dir: Path) -> Manifest:
    """Read and validate ``checkpoint_dir/manifest.json``.

    Raises:
        ManifestError: if the file is missing, is not JSON or does not match the schema.
    """
    path = checkpoint_dir / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: missing, so the checkpoint was never committed") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path}: unreadable or not JSON ({err})") from None
    return Manifest.from_json(data, source=str(path))
