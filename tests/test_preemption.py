"""Preemption: SIGTERM mid-run saves at the next iteration, exits 75, and the relaunch finishes
bitwise equal to a run that was never interrupted."""

from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest
from conftest import DIGITS_CONFIG, LAUNCH_TIMEOUT_S, SMALL_JOB, committed, run_ok, train_command

from dist_bnn.errors import PREEMPTED_EXIT_CODE
from dist_bnn.testing import compare_runs

# Seconds between the epoch-2 commit and the signal: inside epoch 3 on this machine, though
# any moment must give an equal result.
SIGNAL_DELAY_S = 0.08
_PREEMPTION_LINE = re.compile(r"preemption: SIGTERM arrived at iteration (\d+); saved checkpoint \S+ at iteration (\d+)")


def job(run_dir):
    return [
        str(DIGITS_CONFIG), f"run.dir={run_dir}", *SMALL_JOB, "training.num_epochs=5",
        "samples.start_epoch=2", "samples.every_epochs=1", "checkpoint.every_epochs=2",
    ]


@pytest.mark.parametrize("nproc", [None, 2], ids=["plain", "torchrun-2"])
def test_sigterm_saves_and_resumes_exactly(nproc, tmp_path, env):
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    run_ok(train_command(job(reference), nproc=nproc), env)

    process = subprocess.Popen(
        train_command(job(run_dir), nproc=nproc), env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not committed(run_dir, 2) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(SIGNAL_DELAY_S)
    process.send_signal(signal.SIGTERM)  # torchrun forwards it to every worker
    output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)

    if nproc is None:
        assert process.returncode == PREEMPTED_EXIT_CODE, output[-3000:]
    else:
        assert process.returncode != 0, output[-3000:]
    assert "Relaunch the same command to resume" in output
    received, saved = map(int, _PREEMPTION_LINE.search(output).groups())
    assert saved - received <= 1  # the next iteration boundary, after any save in progress

    resumed = run_ok(train_command(job(run_dir), nproc=nproc), env)
    assert f"iteration={saved}" in resumed.stderr
    assert compare_runs(reference, run_dir) is None
