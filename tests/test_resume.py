"""Resume equivalence on real gloo process groups: a killed and relaunched run equals one that
never stopped (sample files, final model and optimizer, metrics and W&B history)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import (
    DIGITS_CONFIG,
    SMALL_JOB,
    assert_same_tree,
    committed,
    load_dcp,
    make_env,
    newest_checkpoint,
    run,
    run_and_kill,
    run_ok,
    sample_hashes,
    train_command,
)
from dist_bnn.training.wandb_offline import history_rows, offline_runs, run_id_of

NUM_EPOCHS = 12
KILL_AFTER_EPOCH = 6
JOB = (
    *SMALL_JOB,
    f"training.num_epochs={NUM_EPOCHS}",
    "samples.start_epoch=4",
    "samples.every_epochs=2",
    "checkpoint.every_epochs=1",
)


def job_args(run_dir: Path, *extra: str) -> list[str]:
    return [str(DIGITS_CONFIG), f"run.dir={run_dir}", *JOB, *extra]


def checkpoint_epochs(run_dir: Path) -> list[int]:
    return sorted(
        json.loads((path / "manifest.json").read_text())["epoch"]
        for path in (run_dir / "checkpoints").glob("epoch*")
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Run A uninterrupted; run B SIGKILLed on all ranks after epoch 6's commit, relaunched."""
    root = tmp_path_factory.mktemp("resume")
    env = make_env(root)
    a, b = root / "a", root / "b"

    run_ok(train_command(job_args(a), nproc=2), env)
    run_and_kill(
        train_command(job_args(b), nproc=2), env,
        ready=lambda: committed(b, KILL_AFTER_EPOCH), what="checkpoint of epoch 6",
        log=root / "b-killed.log",
    )
    killed_at = checkpoint_epochs(b)[-1]
    logs = root / "torchrun-logs"
    resumed = run_ok(
        train_command(job_args(b), nproc=2, launcher_args=["--log-dir", str(logs), "--redirects", "2"]),
        env,
    )
    return {"a": a, "b": b, "root": root, "env": env, "killed_at": killed_at, "logs": logs, "resumed": resumed}


def rank_stderr(logs: Path, rank: int) -> str:
    (path,) = logs.glob(f"*/attempt_0/{rank}/stderr.log")
    return path.read_text(errors="replace")


def test_kill_happened_mid_run(runs):
    assert KILL_AFTER_EPOCH <= runs["killed_at"] < NUM_EPOCHS


def test_samples_bitwise_equal(runs):
    expected = [f"sample_{epoch:04d}.pt" for epoch in range(4, NUM_EPOCHS + 1, 2)]
    a, b = sample_hashes(runs["a"]), sample_hashes(runs["b"])
    assert sorted(a) == expected
    assert b == a


def test_final_model_and_optimizer_equal(runs):
    a = load_dcp(newest_checkpoint(runs["a"]))
    b = load_dcp(newest_checkpoint(runs["b"]))
    assert set(a) == {"model", "optim"}
    assert_same_tree(a, b)


def test_manifests_agree(runs):
    a = json.loads((newest_checkpoint(runs["a"]) / "manifest.json").read_text())
    b = json.loads((newest_checkpoint(runs["b"]) / "manifest.json").read_text())
    for key in ("epoch", "iteration", "epoch_length", "world_size", "sample_files", "final_metrics"):
        assert a[key] == b[key], key
    assert a["epoch"] == NUM_EPOCHS
    assert a["iteration"] == NUM_EPOCHS * a["epoch_length"]


def test_resume_restores_identical_state_on_every_rank(runs):
    log = rank_stderr(runs["logs"], 0)
    epoch = runs["killed_at"]
    epoch_length = json.loads((newest_checkpoint(runs["b"]) / "manifest.json").read_text())["epoch_length"]
    assert f"resumed from {runs['b']}/checkpoints/epoch{epoch:04d}" in log
    assert f": epoch={epoch} iteration={epoch * epoch_length} world_size=2 (identical on all 2 ranks)" in log


def test_progress_lines_carry_true_epoch(runs):
    # The logs are files, not terminals: no progress bar redraws, one line per epoch on rank 0.
    rank0, rank1 = rank_stderr(runs["logs"], 0), rank_stderr(runs["logs"], 1)
    first = runs["killed_at"] + 1
    assert f"epoch {first}/{NUM_EPOCHS}: " in rank0
    assert f"epoch {NUM_EPOCHS}/{NUM_EPOCHS}: " in rank0
    assert f"epoch 1/{NUM_EPOCHS}: " not in rank0
    assert "Epoch [" not in rank0
    assert "Epoch [" not in rank1
    assert f"epoch {first}/{NUM_EPOCHS}: " not in rank1


def test_metrics_jsonl_has_each_epoch_once(runs):
    epoch_length = json.loads((newest_checkpoint(runs["b"]) / "manifest.json").read_text())["epoch_length"]
    for name in ("a", "b"):
        rows = [json.loads(line) for line in (runs[name] / "metrics.jsonl").read_text().splitlines()]
        assert [row["epoch"] for row in rows] == list(range(1, NUM_EPOCHS + 1))
        assert [row["iteration"] for row in rows] == [epoch_length * e for e in range(1, NUM_EPOCHS + 1)]
    a_rows = (runs["a"] / "metrics.jsonl").read_text()
    assert (runs["b"] / "metrics.jsonl").read_text() == a_rows


def test_wandb_history_one_run_each_epoch_once(runs):
    stored_id = json.loads((runs["b"] / "run.json").read_text())["wandb_run_id"]
    launches = offline_runs(runs["b"] / "wandb")
    assert len(launches) == 2  # the killed launch and the relaunch
    assert {run_id_of(path) for path in launches} == {stored_id}
    rows = [row for path in launches for row in history_rows(path)]
    assert [row["epoch"] for row in rows] == list(range(1, NUM_EPOCHS + 1))
    steps = [row["_step"] for row in rows]
    assert steps == sorted(steps)
    assert len(set(steps)) == len(steps)
    assert all(row["_step"] == row["iteration"] for row in rows)

    a_rows = [row for path in offline_runs(runs["a"] / "wandb") for row in history_rows(path)]
    strip = lambda row: {k: v for k, v in row.items() if not k.startswith("_")}  # noqa: E731
    assert [strip(row) for row in rows] == [strip(row) for row in a_rows]


def test_relaunch_of_finished_run_changes_nothing(runs):
    before = {p: p.stat().st_mtime_ns for p in runs["a"].rglob("*") if p.is_file()}
    result = run_ok(train_command(job_args(runs["a"]), nproc=2), runs["env"])
    assert "run complete" in result.stderr
    after = {p: p.stat().st_mtime_ns for p in runs["a"].rglob("*") if p.is_file()}
    assert after == before


def test_smaller_num_epochs_is_an_error(runs):
    result = run(train_command(job_args(runs["a"], "training.num_epochs=8"), nproc=2), runs["env"])
    assert result.returncode != 0
    assert "exitcode  : 2" in result.stderr  # torchrun's report of the workers' exit code
    assert "training.num_epochs=8 is smaller than the 12 epochs already trained" in result.stderr


def test_larger_num_epochs_continues(runs):
    # Runs after the two tests above, which need the finished state (pytest keeps file order).
    before = sample_hashes(runs["a"])
    run_ok(train_command(job_args(runs["a"], "training.num_epochs=14"), nproc=2), runs["env"])
    after = sample_hashes(runs["a"])
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == ["sample_0014.pt"]
    assert checkpoint_epochs(runs["a"])[-2:] == [13, 14]
