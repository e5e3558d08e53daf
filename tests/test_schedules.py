"""Tests of the step-size schedules and of the rule that picks the sample epochs.

The cyclical schedule must have the documented shape: a cosine from ``sampler.lr`` down towards
0 over each cycle of ``sampler.cycle_epochs`` epochs, no noise before ``exploration_fraction``
of the cycle, and samples only from epochs wholly in a sampling phase."""

from __future__ import annotations

import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import DIGITS_CONFIG, LAUNCH_TIMEOUT_S, SMALL_JOB, committed, run_ok, train_command
from torch import nn

from dist_bnn.config import Config, RunConfig, SamplerConfig, is_sample_epoch
from dist_bnn.errors import PREEMPTED_EXIT_CODE
from dist_bnn.samplers import SGLD
from dist_bnn.samplers.schedules import StepSettings, apply_step_settings, step_settings
from dist_bnn.testing import compare_runs

BASE_LR = 0.02
CYCLE_EPOCHS = 4
EXPLORATION_FRACTION = 0.6
EPOCH_LENGTH = 18

# Maximum absolute difference between the schedule's step size and the cosine formula
# evaluated here in another order of operations: float64 rounding of values of order BASE_LR.
LR_ROUNDING_TOLERANCE = 1e-15


def cyclical(**changes) -> SamplerConfig:
    values = dict(
        lr=BASE_LR, schedule="cyclical", cycle_epochs=CYCLE_EPOCHS,
        exploration_fraction=EXPLORATION_FRACTION,
    )
    return SamplerConfig(**{**values, **changes})


def settings_at_step(cfg: SamplerConfig, step: int, epoch_length: int = EPOCH_LENGTH) -> StepSettings:
    """Return the settings of the ``step``-th (0-based) step of the run."""
    return step_settings(cfg, step // epoch_length, step % epoch_length, epoch_length)


def test_constant_schedule_keeps_lr_and_noise() -> None:
    cfg = SamplerConfig(lr=BASE_LR)

    for step in range(0, 10 * EPOCH_LENGTH, 7):
        assert settings_at_step(cfg, step) == StepSettings(lr=BASE_LR, add_noise=True)


def test_cyclical_lr_follows_cosine() -> None:
    cfg = cyclical()
    cycle_steps = CYCLE_EPOCHS * EPOCH_LENGTH

    for step in range(3 * cycle_steps):
        position_in_epochs = step / EPOCH_LENGTH
        phase = math.fmod(position_in_epochs, CYCLE_EPOCHS) / CYCLE_EPOCHS
        expected = BASE_LR * (1 + math.cos(math.pi * phase)) / 2
        assert abs(settings_at_step(cfg, step).lr - expected) < LR_ROUNDING_TOLERANCE, f"step {step}"


def test_cyclical_lr_landmarks() -> None:
    """Full step size at each cycle start, half at mid-cycle, and decreasing in between."""
    cfg = cyclical()
    cycle_steps = CYCLE_EPOCHS * EPOCH_LENGTH

    for cycle in range(3):
        first = cycle * cycle_steps
        assert settings_at_step(cfg, first).lr == BASE_LR
        assert settings_at_step(cfg, first + cycle_steps // 2).lr == pytest.approx(BASE_LR / 2, abs=LR_ROUNDING_TOLERANCE)
        rates = [settings_at_step(cfg, step).lr for step in range(first, first + cycle_steps)]
        assert all(later < earlier for earlier, later in zip(rates, rates[1:]))
        assert 0 < rates[-1] < BASE_LR * 1e-3


def test_cyclical_noise_off_in_exploration() -> None:
    cfg = cyclical()
    cycle_steps = CYCLE_EPOCHS * EPOCH_LENGTH

    for step in range(2 * cycle_steps):
        phase = (step % cycle_steps) / cycle_steps
        assert settings_at_step(cfg, step).add_noise == (phase >= EXPLORATION_FRACTION), f"step {step}"


def test_cyclical_depends_on_epochs_not_steps() -> None:
    """At every epoch start the settings do not depend on the epoch length, so a resume on
    another world size (another epoch length) continues the same schedule."""
    cfg = cyclical()

    for epoch_index in range(3 * CYCLE_EPOCHS):
        long_epochs = step_settings(cfg, epoch_index, 0, EPOCH_LENGTH)
        short_epochs = step_settings(cfg, epoch_index, 0, EPOCH_LENGTH // 2)
        assert long_epochs == short_epochs, f"epoch index {epoch_index}"


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.6, 0.75])
def test_sampling_epochs_have_noise_throughout(fraction: float) -> None:
    """An epoch that the sample rule accepts drew noise at every step; any other epoch of the
    cycle had at least one noise-free step."""
    cfg = Config(run=RunConfig(dir="unused"), sampler=cyclical(exploration_fraction=fraction))
    cfg.samples.start_epoch, cfg.samples.every_epochs = 1, 1

    for epoch in range(1, 3 * CYCLE_EPOCHS + 1):
        noise = [step_settings(cfg.sampler, epoch - 1, batch, EPOCH_LENGTH).add_noise for batch in range(EPOCH_LENGTH)]
        assert is_sample_epoch(cfg, epoch) == all(noise), f"epoch {epoch}"


SAMPLE_EPOCH_CASES = [
    # (schedule changes, start_epoch, every_epochs, accepted epochs among 1..12)
    pytest.param({"schedule": "constant"}, 3, 2, [3, 5, 7, 9, 11], id="constant-thinned"),
    pytest.param({}, 1, 1, [4, 8, 12], id="cyclical-last-epoch-of-each-cycle"),
    pytest.param({"exploration_fraction": 0.5}, 1, 1, [3, 4, 7, 8, 11, 12], id="cyclical-half"),
    pytest.param({"exploration_fraction": 0.5}, 5, 1, [7, 8, 11, 12], id="cyclical-after-burn-in"),
    pytest.param({"exploration_fraction": 0.5}, 2, 2, [4, 8, 12], id="cyclical-thinned"),
    pytest.param({"exploration_fraction": 0.0}, 1, 3, [1, 4, 7, 10], id="cyclical-noise-throughout"),
]


@pytest.mark.parametrize(("changes", "start", "every", "expected"), SAMPLE_EPOCH_CASES)
def test_sample_epoch_rule(changes: dict, start: int, every: int, expected: list[int]) -> None:
    cfg = Config(run=RunConfig(dir="unused"), sampler=cyclical(**changes))
    cfg.samples.start_epoch, cfg.samples.every_epochs = start, every

    assert [epoch for epoch in range(1, 13) if is_sample_epoch(cfg, epoch)] == expected


def test_apply_sets_every_group() -> None:
    first, second = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    sampler = SGLD([{"params": [first]}, {"params": [second]}], lr=BASE_LR, num_data=10)

    apply_step_settings(sampler, StepSettings(lr=0.125, add_noise=False))

    assert [group["lr"] for group in sampler.param_groups] == [0.125, 0.125]
    assert [group["add_noise"] for group in sampler.param_groups] == [False, False]


# ---------------------------------------------------------------------------------------------
# Resume of a cyclical run

# Seconds between the epoch-2 commit and SIGTERM. On the 2-core CI machine the save then lands
# inside epoch 3, the exploration phase of the second cycle, but any moment must give an equal
# result.
SIGNAL_DELAY_S = 0.08
CYCLICAL_JOB = (
    *SMALL_JOB, "sampler.schedule=cyclical", "sampler.cycle_epochs=2",
    "sampler.exploration_fraction=0.5", "sampler.lr=0.02", "training.num_epochs=6",
    "samples.start_epoch=1", "samples.every_epochs=1", "checkpoint.every_epochs=2",
)


def cyclical_args(run_dir: Path) -> list[str]:
    return [str(DIGITS_CONFIG), f"run.dir={run_dir}", *CYCLICAL_JOB]


def test_cyclical_resume_bitwise_equal(tmp_path: Path, env: dict[str, str]) -> None:
    """A cyclical run preempted inside an epoch and relaunched ends bitwise equal to a run
    that never stopped: samples, final model and sampler state, metrics and W&B history."""
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    run_ok(train_command(cyclical_args(reference)), env)

    process = subprocess.Popen(
        train_command(cyclical_args(run_dir)), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while not committed(run_dir, 2) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(SIGNAL_DELAY_S)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    assert process.returncode == PREEMPTED_EXIT_CODE, output[-3000:]

    run_ok(train_command(cyclical_args(run_dir)), env)

    assert sorted(path.name for path in (reference / "samples").iterdir()) == [
        "sample_0002.pt", "sample_0004.pt", "sample_0006.pt"
    ]
    assert compare_runs(reference, run_dir) is None
