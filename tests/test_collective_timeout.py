"""A save slower than the collective timeout: the job dies with a clear error, and the next
launch resumes from the newest committed checkpoint, never from epoch 0 and never losing samples."""

from __future__ import annotations

from conftest import DIGITS_CONFIG, SMALL_JOB, run, run_ok, train_command

from dist_bnn.checkpoint.manager import checkpoint_dirs
from dist_bnn.faults import PAUSE_AT_ENV, PAUSE_RANKS_ENV, PAUSE_SECONDS_ENV
from dist_bnn.testing import compare_runs

# Collective timeout of the slow launch, and the delay of rank 0 inside its second save: rank 1
# waits for rank 0's digests longer than the timeout allows.
TIMEOUT_S = 3
DELAY_S = 12


def job(run_dir, *extra):
    return [
        str(DIGITS_CONFIG), f"run.dir={run_dir}", *SMALL_JOB, "training.num_epochs=5",
        "samples.start_epoch=2", "samples.every_epochs=1", "checkpoint.every_epochs=2", *extra,
    ]


def test_slow_save_past_timeout_resumes(tmp_path, env):
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    run_ok(train_command(job(reference), nproc=2), env)

    slow_env = {**env, PAUSE_AT_ENV: "shards:2", PAUSE_SECONDS_ENV: str(DELAY_S), PAUSE_RANKS_ENV: "0"}
    slow = run(train_command(job(run_dir, f"distributed.timeout_s={TIMEOUT_S}"), nproc=2), slow_env)
    assert slow.returncode != 0, slow.stderr[-3000:]
    assert "distributed.timeout_s" in slow.stderr, slow.stderr[-3000:]
    assert [p.name.split("-")[0] for p in checkpoint_dirs(run_dir)] == ["epoch0002"]
    samples_before = sorted(p.name for p in (run_dir / "samples").glob("sample_*.pt"))

    resumed = run_ok(train_command(job(run_dir), nproc=2), env)
    assert "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    assert "epoch=2 " in resumed.stderr, resumed.stderr[-3000:]
    assert set(samples_before) >= {"sample_0002.pt"}
    assert compare_runs(reference, run_dir) is None
