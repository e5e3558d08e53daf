"""The fault-injection harness, CI-sized: random SIGKILLs, relaunches, and bitwise comparison."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, make_env


# Each seed draws kills while a save is paused at the listed phases. With async saves, seed 3
# kills during the second background write.
@pytest.mark.parametrize(
    ("seed", "options", "phases"),
    [
        (7, [], ["manifest", "commit"]),
        # tests/test_async_save.py covers the async kills in the default run; this one is slow.
        pytest.param(3, ["--async-save"], ["writing", "rng", "manifest"], marks=pytest.mark.slow),
    ],
    ids=["sync", "async"],
)
def test_killed_runs_equal_uninterrupted(seed, options, phases, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "fault_injection.py"), "--trials", "2", "--seed", str(seed),
         *options, "--workdir", str(tmp_path / "runs")],
        env=make_env(tmp_path), capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "2/2 equal" in result.stdout
    for phase in phases:
        assert f"paused at phase {phase!r}" in result.stdout, result.stdout
