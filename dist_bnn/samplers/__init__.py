"""SG-MCMC samplers as ``torch.optim.Optimizer`` subclasses, and a factory from the config.

Every sampler module has the same shape: a module docstring with the update rule, the target
density and its source, then one class with ``__init__`` (hyper-parameter checks and defaults),
``_init_param_state`` (eagerly created per-parameter state) and ``step``.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

from dist_bnn.config import SamplerConfig
from dist_bnn.samplers.base import NOISE_STATE_KEY, SGMCMC
from dist_bnn.samplers.psgld import PSGLD
from dist_bnn.samplers.schedules import warn_unused_schedule_fields
from dist_bnn.samplers.sghmc import SGHMC
from dist_bnn.samplers.sgld import SGLD

__all__ = ["NOISE_STATE_KEY", "PSGLD", "SGHMC", "SGLD", "SGMCMC", "build_sampler"]

logger = logging.getLogger(__name__)

# Fields of SamplerConfig that only some samplers read.
_FIELDS_USED_BY = {
    "momentum": ("sghmc",),
    "psgld_decay": ("psgld",),
    "psgld_epsilon": ("psgld",),
}


def build_sampler(cfg: SamplerConfig, params: Iterable[Any], num_data: int, noise_seed: int) -> SGMCMC:
    """Build the sampler named by ``cfg.name``. Build it on every rank with the same seed.

    The step size starts at ``cfg.lr``. The trainer sets it, and the noise switch, before every
    step from ``cfg.schedule`` (see :mod:`dist_bnn.samplers.schedules`).
    """
    _warn_unused_fields(cfg)
    warn_unused_schedule_fields(cfg)
    common = dict(
        lr=cfg.lr,
        num_data=num_data,
        temperature=cfg.temperature,
        prior_std=cfg.prior_std,
        noise_seed=noise_seed,
    )
    if cfg.name == "sgld":
        return SGLD(params, **common)
    if cfg.name == "sghmc":
        return SGHMC(params, momentum=cfg.momentum, **common)
    if cfg.name == "psgld":
        return PSGLD(params, decay=cfg.psgld_decay, epsilon=cfg.psgld_epsilon, **common)
    raise ValueError(f"unknown sampler {cfg.name!r}; allowed: sgld, sghmc, psgld")


def _warn_unused_fields(cfg: SamplerConfig) -> None:
    for name, users in _FIELDS_USED_BY.items():
        value = getattr(cfg, name)
        if cfg.name not in users and value != getattr(SamplerConfig, name):
            logger.warning("sampler.%s=%g is ignored by sampler.name=%s", name, value, cfg.name)
