"""Saving, finding, verifying, loading and pruning checkpoints (torch.distributed.checkpoint).

Layout of one checkpoint, ``RUN_DIR/checkpoints/epoch0006-iter000000120/``::

    .metadata              DCP's index of the shards, written by rank 0 at the end of dcp.save
    __<rank>_0.distcp      DCP shards of model and optimizer (replicated tensors deduplicated)
    rng/rank_<rank>.pt     each rank's RNG states (tensors and plain numbers)
    manifest.json          written last by rank 0: the commit marker, with every file's digest

Commit rule: every rank writes into ``checkpoints/.partial-<name>/``. When ``dcp.save`` returns,
every rank's shards are written. Each rank hashes its own files, rank 0 gathers the digests,
writes the manifest, fsyncs the directory, renames it to ``<name>`` and fsyncs
``checkpoints/``. A directory is loaded only after its manifest and every file it lists verify.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from dist_bnn import distributed
from dist_bnn.checkpoint.files import file_digest, fsync_dir
from dist_bnn.checkpoint.manifest import MANIFEST_NAME, Manifest, ManifestError, read_manifest, write_manifest
from dist_bnn.checkpoint.rng import load_rank_rng, rank_rng_path, save_rank_rng
from dist_bnn.checkpoint.verify import DCP_METADATA, InvalidCheckpoint, verify_checkpoint
from dist_bnn.errors import CheckpointSaveError, ResumeError
from dist_bnn.faults import pause_point

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
PARTIAL_PREFIX = ".partial-"
INVALID_PREFIX = ".invalid-"
REMOVING_PREFIX = ".removing-"
_NAME_PATTERN = re.compile(r"^epoch(\d{4,})-iter(\d{9,})$")


@dataclass
class CommittedCheckpoint:
    path: Path
    manifest: Manifest


def checkpoint_name(epoch: int, iteration: int) -> str:
    return f"epoch{epoch:04d}-iter{iteration:09d}"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Return the checkpoint directories of ``run_dir`` (committed or not), oldest first.

    Hidden directories (partial writes, set-aside and half-removed checkpoints) are not listed.
    """
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    named = []
    for path in root.iterdir():
        match = _NAME_PATTERN.match(path.name)
        if path.is_dir() and match:
            named.append(((int(match.group(2)), int(match.group(1))), path))
    return [path for _, path in sorted(named)]


def find_committed(run_dir: Path) -> list[CommittedCheckpoint]:
    """Return the checkpoints whose manifest parses, oldest first, without hashing their files.

    A directory whose manifest is missing or invalid is skipped with a warning naming the reason.
    """
    found = []
    for path in checkpoint_dirs(run_dir):
        try:
            found.append(CommittedCheckpoint(path, read_manifest(path)))
        except ManifestError as err:
            logger.warning("skipping checkpoint %s: %s", path, err)
    return found


def select_checkpoint(
    run_dir: Path, samples_dir: Path
) -> tuple[CommittedCheckpoint | None, list[tuple[Path, str]]]:
    """Find the newest checkpoint that verifies. Only rank 0 calls this.

    Returns:
        The newest valid checkpoint (``None`` if there is none) and the ``(path, reason)`` of
        every newer one that failed verification, newest first.
    """
    invalid = []
    for path in reversed(checkpoint_dirs(run_dir)):
        try:
            manifest = verify_checkpoint(path, samples_dir)
        except InvalidCheckpoint as err:
            logger.warning("skipping checkpoint %s: %s", path, err)
            invalid.append((path, str(err)))
            continue
        return CommittedCheckpoint(path, manifest), invalid
    return None, invalid


def set_aside(path: Path) -> Path:
    """Rename an invalid checkpoint to a hidden name, keeping it for inspection. Rank 0 only.

    A resumed run writes a new checkpoint under the same name, so the invalid one must move.
    """
    target = path.with_name(f"{INVALID_PREFIX}{path.name}")
    suffix = 1
    while target.exists():
        suffix += 1
        target = path.with_name(f"{INVALID_PREFIX}{path.name}-{suffix}")
    path.rename(target)
    fsync_dir(path.parent)
    logger.warning("moved invalid checkpoint %s to %s", path, target)
    return target


def remove_partial(run_dir: Path) -> None:
    """Delete directories of interrupted saves and removals. Only rank 0 calls this."""
    root = run_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return
    for prefix, why in ((PARTIAL_PREFIX, "an interrupted save"), (REMOVING_PREFIX, "an interrupted removal")):
        for path in sorted(root.glob(prefix + "*")):
            logger.info("removing checkpoint directory %s left by %s", path, why)
            shutil.rmtree(path)


_SINGLE_PROCESS_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


def _no_process_group() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


@contextlib.contextmanager
def _quiet_single_process():
    # DCP warns on every save and load without a process group, even with no_dist=True, that
    # it assumes a single process. That is the intended mode of a plain process.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
        yield


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def _replicated(state: dict[str, Any]) -> bool:
    """Whether every tensor is a plain tensor, as with DDP; sharded ones (DTensor under FSDP,
    say) are already split between ranks and must be left whole."""

    def plain(node: Any) -> bool:
        if isinstance(node, dict):
            return all(plain(v) for v in node.values())
        return not isinstance(node, torch.Tensor) or type(node) is torch.Tensor or isinstance(node, nn.Parameter)

    return plain(state)


def _own_share(state: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """Return the part of a replicated state dict that this rank writes.

    Data-parallel ranks hold identical state, and DCP writes each replicated tensor once, but
    ``dcp.async_save`` copies the whole state on every rank before it plans who writes what.
    Handing each rank a disjoint share instead makes each rank copy only what it writes. The
    shares are balanced by bytes, greedily over the tensors sorted by size and then key, so
    every rank computes the same assignment. Values that are not tensors go with rank 0. The
    checkpoint contains the union, which every rank loads as usual.
    """
    leaves: list[tuple[tuple[str, ...], Any]] = []

    def collect(node: dict[str, Any], path: tuple[str, ...]) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                collect(value, (*path, str(key)))
            else:
                leaves.append(((*path, str(key)), value))

    collect(state, ())
    owner: dict[tuple[str, ...], int] = {}
    load = [0] * world_size
    tensors = [(path, v) for path, v in leaves if isinstance(v, torch.Tensor)]
    for path, tensor in sorted(tensors, key=lambda item: (-item[1].numel() * item[1].element_size(), item[0])):
        target = min(range(world_size), key=lambda r: (load[r], r))
        owner[path] = target
        load[target] += tensor.numel() * tensor.element_size()

    def prune(node: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
        kept: dict[str, Any] = {}
        for key, value in node.items():
            here = (*path, str(key))
            if isinstance(value, dict):
                child = prune(value, here)
                if child:
                    kept[key] = child
            elif owner.get(here, 0) == rank:
                kept[key] = value
        return kept

    return prune(state, ())


def _gather_json(value: Any, what: str) -> list[Any]:
    """All-gather ``value`` during a save; turn a failed collective into a clear error. Every
    rank must call this.

    A collective fails when another rank died or took longer than the process group's timeout
    (a slow disk on one rank, say). The checkpoint in progress is then lost, never committed.
    """
    try:
        return distributed.all_gather_json(value)
    except RuntimeError as err:
        raise CheckpointSaveError(
            f"{what} failed: the ranks lost each other ({err}). Another rank stopped, or was "
            f"slower than distributed.timeout_s allows. The previous checkpoint is intact: "
            f"relaunch the same command to resume from it, and raise distributed.timeout_s if "
            f"saves are slow on this file system"
        ) from err


def _agree(error: str | None, what: str) -> None:
    """Raise on every rank if any rank reports an error. Every rank must call this."""
    errors = [(rank, e) for rank, e in enumerate(_gather_json(error, what)) if e is not None]
    if errors:
        details = "; ".join(f"rank {rank}: {e}" for rank, e in errors)
        raise CheckpointSaveError(
            f"{what} failed ({details}). The previous checkpoint is intact: check free disk space "
            f"and quotas, then relaunch the same command to resume from it"
        )


def save_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    manifest: Manifest,
    rank_extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write, verify-stamp and commit one checkpoint. Every rank must call this.

    Args:
        run_dir: the run directory; the checkpoint goes under ``run_dir/checkpoints``.
        model: the (possibly DDP-wrapped) model; DCP stores plain parameter names.
        optimizer: the sampler, whose state includes the shared noise generator.
        manifest: progress to commit, with ``files`` left empty; only rank 0's copy is written.
        rank_extra: tensors that differ per rank (a running loss sum, say), stored with this
            rank's RNG states and returned by :func:`load_checkpoint` under ``"extra"``.

    Returns:
        The committed checkpoint directory.

    Raises:
        CheckpointSaveError: on every rank when any rank failed to write (a full disk, say).
            The previous checkpoint is untouched and the partial directory is removed.
    """
    start = time.perf_counter()
    save = _SaveInProgress.prepare(run_dir, manifest, rank_extra)
    with save.cleanup_on_error():
        try:
            with _quiet_single_process():
                dcp.save(
                    _state(model, optimizer),
                    storage_writer=_PausingWriter(save.partial, save.rank),
                    no_dist=_no_process_group(),
                )
        # DCP raises CheckpointException (a BaseException) on every rank for any rank's error.
        except (Exception, dcp.CheckpointException) as err:
            raise save.write_error(err) from err
        save.commit()
    logger.info(
        "saved checkpoint %s (epoch %d, iteration %d) in %.2f s",
        save.final,
        manifest.epoch,
        manifest.iteration,
        time.perf_counter() - start,
    )
    return save.final


class AsyncCheckpointer:
    """Checkpoints written by ``dcp.async_save`` in a background thread, at most one in flight.

    Build on every rank after the process group exists. It creates its own gloo group for DCP's
    collectives: on the default group, DCP's background thread and the training loop's
    collectives deadlock on gloo.

    Commit rule: :meth:`save` only stages the state and starts the write. The checkpoint is
    committed (digests hashed, manifest written, directory renamed) by :meth:`commit_pending`,
    which the trainer calls before the next save and at the end of the run. Until then the
    checkpoint is a hidden ``.partial-`` directory that no resume loads, so a kill during the
    background write resumes from the previous committed checkpoint.
    """

    def __init__(self) -> None:
        self._group = None if _no_process_group() else torch.distributed.new_group(backend="gloo")
        if self._group is None:
            # The background thread runs outside _quiet_single_process; see there.
            warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
        self._pending: tuple[_SaveInProgress, Any, float] | None = None
        # One stager for every save: it keeps its staging buffers from one save to the next,
        # so a save copies into memory that is already mapped instead of faulting in new pages.
        on_gpu = torch.cuda.is_available()
        self._stager = DefaultStager(StagingOptions(
            use_pinned_memory=on_gpu, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=False,
        ))

    def save(
        self,
        run_dir: Path,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        manifest: Manifest,
        rank_extra: dict[str, torch.Tensor] | None = None,
    ) -> float:
        """Stage the state and start writing it in the background; return the seconds training
        was blocked. Every rank must call this. Commit the pending save first with
        :meth:`commit_pending`.

        Raises:
            CheckpointSaveError: on every rank when any rank failed to prepare the directory.
        """
        if self._pending is not None:
            raise RuntimeError("a checkpoint is still in flight; call commit_pending() before save()")
        start = time.perf_counter()
        save = _SaveInProgress.prepare(run_dir, manifest, rank_extra)
        with save.cleanup_on_error():
            try:
                with _quiet_single_process():
                    # The default stager copies every tensor before async_save returns, so the
                    # training steps that follow cannot change what is written.
                    state = _state(model, optimizer)
                    if self._group is not None and _replicated(state):
                        state = _own_share(state, save.rank, distributed.world_size())
                    future = dcp.async_save(
                        state,
                        storage_writer=_PausingWriter(save.partial, save.rank),
                        process_group=self._group,
                        async_stager=self._stager,
                        no_dist=_no_process_group(),
                    )
            except (Exception, dcp.CheckpointException) as err:
                raise save.write_error(err) from err
        blocked = time.perf_counter() - start
        self._pending = (save, future, time.perf_counter())
        logger.info(
            "checkpoint %s (epoch %d, iteration %d): training blocked %.3f s, writing in the "
            "background",
            save.final,
            manifest.epoch,
            manifest.iteration,
            blocked,
        )
        return blocked

    def commit_pending(self) -> tuple[Path, Manifest] | None:
        """Wait for the background write, then commit it; return its path and manifest, or
        ``None`` when nothing was in flight. Every rank must call this.

        Raises:
            CheckpointSaveError: on every rank when any rank's write failed. The partial
                directory is removed and the previous checkpoint is untouched.
        """
        if self._pending is None:
            return None
        save, future, started = self._pending
        self._pending = None
        start = time.perf_counter()
        with save.cleanup_on_error():
            error = None
            try:
                future.result()
            except (Exception, dcp.CheckpointException) as err:
                error = f"{type(err).__name__}: {err}"
            _agree(error, f"writing checkpoint {save.partial} in the background")
            save.commit()
        logger.info(
            "committed checkpoint %s (epoch %d, iteration %d): written in the background in "
            "%.2f s, training waited %.3f s for it to finish",
            save.final,
            save.manifest.epoch,
            save.manifest.iteration,
            start - started,
            time.perf_counter() - start,
        )
        return save.final, save.manifest


class _PausingWriter(dcp.FileSystemWriter):
    """DCP's file writer with the ``writing`` fault-injection pause point (see
    :mod:`dist_bnn.faults`); it runs in the background thread under ``dcp.async_save``."""

    def __init__(self, path: Path, rank: int) -> None:
        super().__init__(path)
        self._rank = rank

    def write_data(self, plan, planner):  # type: ignore[no-untyped-def]
        pause_point("writing", self._rank)
        return super().write_data(plan, planner)


@dataclass
class _SaveInProgress:
    """One checkpoint between its first file and its commit."""

    partial: Path
    final: Path
    rank: int
    manifest: Manifest

    @classmethod
    def prepare(
        cls, run_dir: Path, manifest: Manifest, rank_extra: dict[str, torch.Tensor] | None
    ) -> _SaveInProgress:
        """Create the partial directory and write this rank's RNG file. Every rank calls this."""
        name = checkpoint_name(manifest.epoch, manifest.iteration)
        root = run_dir / CHECKPOINTS_DIR
        save = cls(root / f"{PARTIAL_PREFIX}{name}", root / name, distributed.rank(), manifest)
        with save.cleanup_on_error():
            error = None
            try:
                if save.final.exists():
                    raise FileExistsError(f"checkpoint {save.final} already exists; refusing to overwrite it")
                save.partial.mkdir(parents=True, exist_ok=True)
                save_rank_rng(save.partial, save.rank, rank_extra)
            except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
                error = f"{type(err).__name__}: {err}"
            _agree(error, f"preparing checkpoint {save.partial}")
            pause_point("rng", save.rank)
        return save

    @contextlib.contextmanager
    def cleanup_on_error(self):  # type: ignore[no-untyped-def]
        """Remove the partial directory (rank 0) when a :class:`CheckpointSaveError` passes."""
        try:
            yield
        except CheckpointSaveError:
            if distributed.is_writer():
                shutil.rmtree(self.partial, ignore_errors=True)
            raise

    def write_error(self, err: BaseException) -> CheckpointSaveError:
        return CheckpointSaveError(
            f"writing checkpoint shards to {self.partial} failed ({err}). The previous checkpoint "
            f"is intact: check free disk space and quotas, then relaunch the same command to "
            f"resume"
        )

    def commit(self) -> None:
        """Hash the written files, write the manifest and rename the directory. Every rank
        calls this, after every rank's shards are written."""
        partial, rank, manifest = self.partial, self.rank, self.manifest
        pause_point("shards", rank)

        # Each rank hashes the files it wrote; rank 0 also hashes .metadata and anything else.
        own = {}
        for path in [*partial.glob(f"__{rank}_*.distcp"), rank_rng_path(partial, rank)]:
            own[str(path.relative_to(partial))] = file_digest(path)
        digests: dict[str, Any] = {}
        for part in _gather_json(own, f"committing checkpoint {self.final}"):
            digests.update(part)

        error = None
        if distributed.is_writer():
            try:
                for path in sorted(p for p in partial.rglob("*") if p.is_file()):
                    relative = str(path.relative_to(partial))
                    if relative not in digests and relative != MANIFEST_NAME:
                        digests[relative] = file_digest(path)
                if DCP_METADATA not in digests:
                    raise FileNotFoundError(f"dcp.save left no {DCP_METADATA} in {partial}")
                manifest.files = digests
                write_manifest(partial, manifest)
                fsync_dir(partial / "rng")
                fsync_dir(partial)
                pause_point("manifest", rank)
                partial.rename(self.final)
                fsync_dir(self.final.parent)
                pause_point("commit", rank)
            except OSError as err:
                error = f"{type(err).__name__}: {err}"
        _agree(error, f"committing checkpoint {self.final}")


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, load_rng: bool = True
) -> dict[str, Any] | None:
    """Load model and optimizer state in place from a verified checkpoint. Every rank must call
    this.

    DCP reshards on load, so the checkpoint may come from another world size. Pass
    ``load_rng=False`` then, because the per-rank RNG files belong to the old ranks.

    Returns:
        This rank's stored RNG states (``None`` with ``load_rng=False``), to restore with
        :func:`dist_bnn.checkpoint.rng.restore_rng_state` right before training continues, and
        under ``"extra"`` the ``rank_extra`` tensors given to :func:`save_checkpoint`.

    Raises:
        ResumeError: if the model's parameter names differ from the checkpoint's (a parameter
            added to or removed from the model since the checkpoint was written).
    """
    start = time.perf_counter()
    state = _state(model, optimizer)
    _check_model_keys(path, state["model"])
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=path, no_dist=_no_process_group())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_state = load_rank_rng(path, distributed.rank()) if load_rng else None
    logger.info("loaded checkpoint %s in %.2f s", path, time.perf_counter() - start)
    return rng_state


def _check_model_keys(path: Path, model_state: dict[str, Any]) -> None:
    # DCP's default planner raises for a missing key but silently skips a stored key that the
    # model no longer has. Both mean the code changed under the run, so name them up front.
    metadata = dcp.FileSystemReader(path).read_metadata()
    stored = {key[len("model."):] for key in metadata.state_dict_metadata if key.startswith("model.")}
    expected = set(model_state)
    missing, unused = sorted(expected - stored), sorted(stored - expected)
    if missing or unused:
        parts = []
        if missing:
            parts.append(f"the model has parameter(s) missing from the checkpoint: {', '.join(missing)}")
        if unused:
            parts.append(f"the checkpoint has parameter(s) the model lacks: {', '.join(unused)}")
        raise ResumeError(
            f"checkpoint {path} does not match the model ({'; '.join(parts)}). Resume with the code "
            f"and model.* settings that wrote it, or start a new run.dir"
        )


def apply_retention(
    run_dir: Path,
    keep_last: int | None,
    keep_best: int,
    best_metric: str,
    best_mode: str,
    protect: set[Path],
) -> None:
    """Delete committed checkpoints that no rule keeps. Only rank 0 calls this, after a commit.

    Kept: the ``keep_last`` newest (all when ``None``), the ``keep_best`` best by
    ``best_metric`` (``best_mode`` ``min`` or ``max``) and every path in ``protect``. The
    bookkeeping is read from the manifests on disk each time, so it is right after any crash.
    A checkpoint is renamed to a hidden name before it is deleted, so a crash mid-delete never
    leaves a half-deleted directory that looks committed.
    """
    if keep_last is None:
        return
    committed = find_committed(run_dir)
    keep = {c.path for c in committed[-keep_last:]} | set(protect)
    if keep_best:
        rated = [c for c in committed if isinstance(c.manifest.metrics.get(best_metric), (int, float))]
        rated.sort(key=lambda c: c.manifest.metrics[best_metric], reverse=best_mode == "max")
        keep |= {c.path for c in rated[:keep_best]}
    for checkpoint in committed:
        if checkpoint.path in keep:
            continue
        doomed = checkpoint.path.with_name(f"{REMOVING_PREFIX}{checkpoint.path.name}")
        checkpoint.path.rename(doomed)
        fsync_dir(doomed.parent)
        shutil.rmtree(doomed)
        logger.info(
            "removed checkpoint %s (checkpoint.keep_last=%s, checkpoint.keep_best=%d)",
            checkpoint.path,
            keep_last,
            keep_best,
        )
