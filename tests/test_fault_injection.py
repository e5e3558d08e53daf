"""The fault-injection harness, CI-sized: random SIGKILLs, relaunches, and bitwise comparison."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, make_env


def test_killed_runs_equal_uninterrupted(tmp_path):
    # Seed 0 draws, per trial, a kill while a save is paused (after the commit rename, then
    # after the manifest write) followed by a kill after a random delay.
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "fault_injection.py"), "--trials", "2", "--seed", "0",
         "--workdir", str(tmp_path / "runs")],
        env=make_env(tmp_path), capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "2/2 equal" in result.stdout
    assert "paused at phase 'commit'" in result.stdout
    assert "paused at phase 'manifest'" in result.stdout
