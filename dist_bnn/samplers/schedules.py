"""Step-size schedules: the step size and noise switch of each step as a pure function of the
step's position in the run.

The position of a step is measured in epochs: ``p = epoch_index + batch_index / epoch_length``,
with the 0-based index of the epoch and of the batch within it. Nothing else enters, so a run
resumed anywhere (inside an epoch after a preemption, or at an epoch boundary on another world
size, where ``epoch_length`` changes) needs no schedule state and gets the same step sizes.

``constant``: step size ``sampler.lr`` and noise at every step.

``cyclical`` (cSGLD / cSGHMC; Zhang, Li, Zhang, Chen and Wilson, "Cyclical Stochastic Gradient
MCMC for Bayesian Deep Learning", ICLR 2020): with cycle length ``C`` (``sampler.cycle_epochs``)
and the phase ``r = (p mod C) / C`` in [0, 1)::

    lr(p) = sampler.lr / 2 * (cos(pi * r) + 1)

The noise is off while ``r < sampler.exploration_fraction`` (the exploration phase, where the
sampler is an optimiser that moves to a new mode) and on for the rest of the cycle (the sampling
phase). :func:`dist_bnn.config.is_sample_epoch` writes samples only from epochs that lie wholly
in a sampling phase.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from torch.optim import Optimizer

from dist_bnn.config import SamplerConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepSettings:
    """Hyper-parameters that a schedule sets in every parameter group before a step."""

    lr: float
    """Step size of this step, on the scale of ``sampler.lr``."""
    add_noise: bool
    """Whether this step draws Langevin noise."""


def step_settings(cfg: SamplerConfig, epoch_index: int, batch_index: int, epoch_length: int) -> StepSettings:
    """Return the settings of the step that trains batch ``batch_index`` (0-based) of epoch
    ``epoch_index`` (0-based), in an epoch of ``epoch_length`` batches."""
    if cfg.schedule == "constant":
        return StepSettings(lr=cfg.lr, add_noise=True)
    # The phase as one division of integers, so it is the same float whatever the path that led
    # to this step, and the comparison with exploration_fraction agrees with the epoch-level
    # rule of config.in_sampling_phase at epoch starts.
    steps_into_cycle = (epoch_index % cfg.cycle_epochs) * epoch_length + batch_index
    phase = steps_into_cycle / (cfg.cycle_epochs * epoch_length)
    lr = cfg.lr / 2 * (math.cos(math.pi * phase) + 1)
    return StepSettings(lr=lr, add_noise=phase >= cfg.exploration_fraction)


def apply_step_settings(optimizer: Optimizer, settings: StepSettings) -> None:
    """Set ``lr`` and ``add_noise`` of every parameter group of ``optimizer``."""
    for group in optimizer.param_groups:
        group["lr"] = settings.lr
        group["add_noise"] = settings.add_noise


def warn_unused_schedule_fields(cfg: SamplerConfig) -> None:
    """Warn about cyclical-schedule fields set away from their defaults under ``constant``."""
    if cfg.schedule != "constant":
        return
    for name in ("cycle_epochs", "exploration_fraction"):
        if getattr(cfg, name) != getattr(SamplerConfig, name):
            logger.warning("sampler.%s=%g is ignored by sampler.schedule=constant", name, getattr(cfg, name))
