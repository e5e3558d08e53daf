"""``dist-bnn inspect`` on a run directory left by a save killed halfway."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import DIGITS_CONFIG, LAUNCH_TIMEOUT_S, SMALL_JOB, run, run_and_kill, train_command

from dist_bnn.faults import PAUSE_AT_ENV, PAUSE_MARKER_ENV


def inspect(run_dir: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dist_bnn", "inspect", str(run_dir), *extra],
        env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
    )


def test_inspect_shows_committed_and_partial(tmp_path, env):
    run_dir = tmp_path / "run"
    marker = tmp_path / "paused"
    paused_env = {**env, PAUSE_AT_ENV: "shards:3", PAUSE_MARKER_ENV: str(marker)}
    args = [str(DIGITS_CONFIG), f"run.dir={run_dir}", *SMALL_JOB, "training.num_epochs=3",
            "samples.start_epoch=2", "samples.every_epochs=1", "checkpoint.every_epochs=1"]
    # The third save stops after writing its shards: two committed checkpoints, one partial.
    run_and_kill(train_command(args), paused_env, ready=marker.exists, what="pause in the third save",
                 log=tmp_path / "killed.log")

    result = inspect(run_dir, env, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    statuses = [(c["name"].split("-")[0], c["status"]) for c in report["checkpoints"]]
    assert statuses == [("epoch0001", "committed"), ("epoch0002", "committed"), (".partial", "partial")]
    assert [c["epoch"] for c in report["checkpoints"]] == [1, 2, None]
    assert [c["num_samples"] for c in report["checkpoints"]] == [0, 1, None]
    assert report["checkpoints"][2]["size_bytes"] > 0
    assert report["resume_from"].startswith("epoch0002")
    assert report["next_action"].startswith("resume from epoch0002")

    text = inspect(run_dir, env)
    assert text.returncode == 0
    assert "next launch: resume from epoch0002" in text.stdout
    assert ".partial-epoch0003" in text.stdout


def test_inspect_names_invalid_reason(tmp_path, env):
    run_dir = tmp_path / "run"
    args = [str(DIGITS_CONFIG), f"run.dir={run_dir}", *SMALL_JOB, "training.num_epochs=2",
            "samples.start_epoch=2", "checkpoint.every_epochs=1", "wandb.mode=disabled"]
    assert run(train_command(args), env).returncode == 0
    newest = sorted((run_dir / "checkpoints").glob("epoch0002-*"))[0]
    (newest / ".metadata").write_bytes(b"planted")

    report = json.loads(inspect(run_dir, env, "--json").stdout)
    assert [c["status"] for c in report["checkpoints"]] == ["committed", "invalid"]
    assert ".metadata has 7 bytes" in report["checkpoints"][1]["reason"]
    assert "after setting aside epoch0002" in report["next_action"]


def test_inspect_rejects_foreign_directory(tmp_path, env):
    result = inspect(tmp_path, env)
    assert result.returncode == 2
    assert "is not a dist_bnn run directory" in result.stderr
