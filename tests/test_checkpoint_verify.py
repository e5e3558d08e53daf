"""Checkpoint verification, fallback to the newest valid checkpoint, retention, a full disk and
model changes, on real runs and real DCP files."""

from __future__ import annotations

import json
import pickle
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import DIGITS_CONFIG, LAUNCH_TIMEOUT_S, SMALL_JOB, make_env, run, run_ok, sample_hashes, train_command
from torch import nn

from dist_bnn.checkpoint import manager
from dist_bnn.checkpoint.manifest import Manifest
from dist_bnn.errors import CheckpointSaveError, ResumeError
from dist_bnn.models import MLP
from dist_bnn.samplers import SGHMC
from dist_bnn.training.wandb_offline import history_rows, offline_runs


def job(run_dir: Path, *extra: str) -> list[str]:
    return [
        str(DIGITS_CONFIG), f"run.dir={run_dir}", *SMALL_JOB, "training.num_epochs=4",
        "samples.start_epoch=2", "samples.every_epochs=1", "checkpoint.every_epochs=1", *extra,
    ]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("verify")
    env = make_env(root)
    run_dir = root / "run"
    run_ok(train_command(job(run_dir)), env)
    return {"dir": run_dir, "env": env, "hashes": sample_hashes(run_dir)}


@pytest.fixture
def damaged(finished, tmp_path) -> Path:
    """A copy of the finished run whose checkpoints the test may damage."""
    copy = tmp_path / "run"
    shutil.copytree(finished["dir"], copy, symlinks=True)
    return copy


def newest(run_dir: Path) -> Path:
    return manager.checkpoint_dirs(run_dir)[-1]


class PlantedPayload:
    """Unpickling this creates the file ``marker``: proof that a planted pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def truncate_shard(path: Path) -> None:
    shard = next(path.glob("__0_*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])


def flip_rng_byte(path: Path) -> None:
    rng = path / "rng" / "rank_00000.pt"
    data = bytearray(rng.read_bytes())
    data[-30] ^= 0xFF
    rng.write_bytes(bytes(data))


def delete_listed_sample(path: Path) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    (path.parent.parent / "samples" / manifest["sample_files"][-1]).unlink()


DAMAGES = [
    pytest.param(truncate_shard, "bytes, expected", id="truncated-shard"),
    pytest.param(lambda p: (p / ".metadata").unlink(), ".metadata is missing", id="missing-metadata"),
    pytest.param(lambda p: (p / "manifest.json").unlink(), "was never committed", id="missing-manifest"),
    pytest.param(flip_rng_byte, "has sha256", id="checksum-mismatch"),
    pytest.param(delete_listed_sample, "sample_0004.pt is missing", id="deleted-sample"),
]


@pytest.mark.parametrize(("damage", "reason"), DAMAGES)
def test_damaged_newest_falls_back(damaged, damage, reason, caplog):
    broken = newest(damaged)
    damage(broken)
    chosen, invalid = manager.select_checkpoint(damaged, damaged / "samples")
    assert chosen is not None
    assert chosen.manifest.epoch == 3
    assert [path for path, _ in invalid] == [broken]
    assert reason in invalid[0][1]
    assert f"skipping checkpoint {broken}" in caplog.text


def test_planted_pickle_never_runs(damaged, tmp_path):
    marker = tmp_path / "pickle-ran"
    broken = newest(damaged)
    (broken / ".metadata").write_bytes(pickle.dumps(PlantedPayload(marker)))
    chosen, invalid = manager.select_checkpoint(damaged, damaged / "samples")
    assert chosen.manifest.epoch == 3
    assert "has " in invalid[0][1]
    assert not marker.exists()


def test_relaunch_after_damage_finishes_equal(finished, damaged, tmp_path):
    marker = tmp_path / "pickle-ran"
    broken = newest(damaged)
    (broken / ".metadata").write_bytes(pickle.dumps(PlantedPayload(marker)))
    result = run_ok(train_command(job(damaged)), finished["env"])
    assert "skipping checkpoint" in result.stderr
    assert f"moved invalid checkpoint {broken}" in result.stderr
    assert "epoch=3" in result.stderr
    assert not marker.exists()
    assert sample_hashes(damaged) == finished["hashes"]
    assert (damaged / "checkpoints" / f".invalid-{broken.name}").is_dir()
    rows = [row for path in offline_runs(damaged / "wandb") for row in history_rows(path)]
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]


def test_finished_run_relogs_lost_wandb_rows(finished, damaged):
    # A kill right after the last commit can leave W&B without rows; here they are all lost.
    for path in offline_runs(damaged / "wandb"):
        (next(path.glob("run-*.wandb"))).write_bytes(b":W&B\xe1\xbe\x00")
    result = run_ok(train_command(job(damaged)), finished["env"])
    assert "run complete" in result.stderr
    rows = [row for path in offline_runs(damaged / "wandb") for row in history_rows(path)]
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]


def test_no_valid_checkpoint_is_an_error(finished, damaged):
    for path in manager.checkpoint_dirs(damaged):
        (path / "manifest.json").unlink()
    before = sorted(damaged.rglob("*"))
    result = run(train_command(job(damaged)), finished["env"])
    assert result.returncode == 2
    assert "contains 4 checkpoint(s) but none verifies" in result.stderr
    assert sorted(damaged.rglob("*")) == before


def test_retention_keeps_last_and_best(tmp_path, env):
    run_dir = tmp_path / "run"
    extra = ["training.num_epochs=6", "checkpoint.keep_last=2", "checkpoint.keep_best=1",
             "checkpoint.best_metric=val/nll", "checkpoint.best_mode=min"]
    run_ok(train_command(job(run_dir, *extra)), env)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    best_epoch = min(rows, key=lambda row: row["val/nll"])["epoch"]
    kept = {manager.read_manifest(p).epoch for p in manager.checkpoint_dirs(run_dir)}
    assert kept == {5, 6, best_epoch}
    assert not list((run_dir / "checkpoints").glob(".*"))


def limit_file_size(limit: int):
    def apply() -> None:
        # Without this, writing past RLIMIT_FSIZE kills the process with SIGXFSZ instead of
        # failing the write with EFBIG, which is how a full disk looks to the program.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_full_disk_keeps_previous_checkpoint(tmp_path, env):
    run_dir = tmp_path / "run"
    run_ok(train_command(job(run_dir, "training.num_epochs=2", "wandb.mode=disabled")), env)
    shard_size = next(manager.checkpoint_dirs(run_dir)[-1].glob("__0_*.distcp")).stat().st_size
    sample_size = (run_dir / "samples" / "sample_0002.pt").stat().st_size
    assert sample_size < shard_size  # the limit below lets samples through and stops shards

    result = subprocess.run(
        train_command(job(run_dir, "wandb.mode=disabled")), env=env, capture_output=True, text=True,
        timeout=LAUNCH_TIMEOUT_S, preexec_fn=limit_file_size((sample_size + shard_size) // 2),
    )
    assert result.returncode != 0
    assert result.returncode == 1
    assert "dist-bnn: error: writing checkpoint shards to" in result.stderr or "dist-bnn: error: preparing checkpoint" in result.stderr
    # Once: from the command line, not repeated by Ignite's engine before it re-raises.
    assert result.stderr.count("The previous checkpoint is intact") == 1
    chosen, invalid = manager.select_checkpoint(run_dir, run_dir / "samples")
    assert chosen.manifest.epoch == 2
    assert invalid == []
    assert not list((run_dir / "checkpoints").glob(".partial-*"))

    run_ok(train_command(job(run_dir, "wandb.mode=disabled")), env)
    reference = tmp_path / "reference"
    run_ok(train_command(job(reference, "wandb.mode=disabled")), env)
    assert sample_hashes(run_dir) == sample_hashes(reference)


def saved_checkpoint(tmp_path: Path, model: nn.Module) -> Path:
    optimizer = SGHMC(model.parameters(), lr=0.01, num_data=10)
    manifest = Manifest(
        epoch=1, iteration=1, epoch_length=1, num_epochs=1, world_size=1, sample_files=[],
        files={}, samples={}, wandb_run_id="test", config_hash="", config={}, versions={},
    )
    return manager.save_checkpoint(tmp_path, model, optimizer, manifest)


class Grown(MLP):
    def __init__(self) -> None:
        super().__init__(3, [4], 2)
        self.scale = nn.Parameter(torch.ones(1))


def test_added_parameter_named(tmp_path):
    path = saved_checkpoint(tmp_path, MLP(3, [4], 2))
    model = Grown()
    with pytest.raises(ResumeError, match="missing from the checkpoint: scale"):
        manager.load_checkpoint(path, model, SGHMC(model.parameters(), lr=0.01, num_data=10))


def test_removed_parameter_named(tmp_path):
    path = saved_checkpoint(tmp_path, Grown())
    model = MLP(3, [4], 2)
    with pytest.raises(ResumeError, match="the checkpoint has parameter\\(s\\) the model lacks: scale"):
        manager.load_checkpoint(path, model, SGHMC(model.parameters(), lr=0.01, num_data=10))


def test_loads_without_process_group(tmp_path):
    torch.manual_seed(0)
    saved = MLP(3, [4], 2)
    path = saved_checkpoint(tmp_path, saved)
    loaded = MLP(3, [4], 2)
    manager.load_checkpoint(path, loaded, SGHMC(loaded.parameters(), lr=0.01, num_data=10))
    for name, tensor in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_existing_checkpoint_not_overwritten(tmp_path):
    saved_checkpoint(tmp_path, MLP(3, [4], 2))
    with pytest.raises(CheckpointSaveError, match="already exists"):
        saved_checkpoint(tmp_path, MLP(3, [4], 2))
