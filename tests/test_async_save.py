"""Async checkpoints (``checkpoint.async_save``): the same run as synchronous saves, a kill during
the background write resumes from the previous committed checkpoint, and ``keep_last=1`` never
leaves the run without a loadable checkpoint."""

from __future__ import annotations

import re

import pytest
from conftest import DIGITS_CONFIG, SMALL_JOB, run_and_kill, run_ok, train_command

from dist_bnn.checkpoint.manager import checkpoint_dirs
from dist_bnn.checkpoint.verify import verify_checkpoint
from dist_bnn.faults import PAUSE_AT_ENV, PAUSE_MARKER_ENV
from dist_bnn.testing import compare_runs, job_environment

_BLOCKED_LINE = re.compile(r"checkpoint \S+ \(epoch (\d+), iteration \d+\): training blocked (\d+\.\d+) s")


def job(run_dir, *extra):
    return [
        str(DIGITS_CONFIG), f"run.dir={run_dir}", *SMALL_JOB, "training.num_epochs=7",
        "samples.start_epoch=2", "samples.every_epochs=1", "checkpoint.every_epochs=2", *extra,
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same job with synchronous saves, never interrupted, on 2 ranks."""
    root = tmp_path_factory.mktemp("reference")
    run_ok(train_command(job(root / "run"), nproc=2), job_environment(root))
    return root / "run"


def test_async_run_matches_sync_run(reference, tmp_path, env):
    run_dir = tmp_path / "run"
    result = run_ok(train_command(job(run_dir, "checkpoint.async_save=true"), nproc=2), env)
    blocked = {int(epoch): float(seconds) for epoch, seconds in _BLOCKED_LINE.findall(result.stderr)}
    # Epochs 2, 4 and 6 are written in the background; the last epoch's save is synchronous.
    assert sorted(blocked) == [2, 4, 6], result.stderr[-3000:]
    assert "committed checkpoint" in result.stderr
    assert compare_runs(reference, run_dir) is None
    assert [p.name.split("-")[0] for p in checkpoint_dirs(run_dir)] == [
        "epoch0002", "epoch0004", "epoch0006", "epoch0007",
    ]
    for path in checkpoint_dirs(run_dir):
        verify_checkpoint(path, run_dir / "samples")


@pytest.mark.parametrize(
    ("keep_last", "paused_save", "resume_epoch"),
    [(None, 2, 2), (1, 3, 4)],
    ids=["kill-during-background-write", "keep-last-1"],
)
def test_kill_in_background_write_resumes(
    keep_last, paused_save, resume_epoch, reference, tmp_path, env
):
    run_dir = tmp_path / "run"
    args = job(run_dir, "checkpoint.async_save=true", f"checkpoint.keep_last={keep_last or 'null'}")
    marker = tmp_path / "paused"
    paused_env = {**env, PAUSE_AT_ENV: f"writing:{paused_save}", PAUSE_MARKER_ENV: str(marker)}
    run_and_kill(
        train_command(args, nproc=2), paused_env, marker.exists,
        f"the background write of save {paused_save}", tmp_path / "killed.log",
    )

    # The save in flight left only a hidden partial directory; the previous one is committed
    # and, with keep_last=1, its predecessor was pruned only after it committed.
    partial = list((run_dir / "checkpoints").glob(".partial-*"))
    assert len(partial) == 1, partial
    kept = checkpoint_dirs(run_dir)
    assert kept[-1].name.startswith(f"epoch{resume_epoch:04d}-"), kept
    if keep_last == 1:
        assert len(kept) == 1, kept
    verify_checkpoint(kept[-1], run_dir / "samples")

    resumed = run_ok(train_command(args, nproc=2), env)
    assert f"resumed from {kept[-1]}" in resumed.stderr
    assert "left by an interrupted save" in resumed.stderr
    assert compare_runs(reference, run_dir) is None


def test_own_shares_disjoint_and_balanced():
    import torch

    from dist_bnn.checkpoint.manager import _own_share

    state = {
        "model": {f"layer{i}.weight": torch.zeros(100 * (i + 1)) for i in range(6)},
        "optim": {"state": {"layer0.weight": {"momentum_buffer": torch.zeros(300)}}, "param_groups": [{"lr": 0.1}]},
    }
    shares = [_own_share(state, rank, 2) for rank in range(2)]

    def leaves(node, path=()):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, (*path, key))
            else:
                yield (*path, key), value

    owned = [dict(leaves(share)) for share in shares]
    assert not owned[0].keys() & owned[1].keys()
    assert owned[0].keys() | owned[1].keys() == dict(leaves(state)).keys()
    assert ("optim", "param_groups") in owned[0]  # values that are not tensors stay with rank 0
    sizes = [sum(v.numel() for v in share.values() if isinstance(v, torch.Tensor)) for share in owned]
    assert abs(sizes[0] - sizes[1]) <= 100, sizes
