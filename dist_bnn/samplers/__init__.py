"""SG-MCMC samplers as ``torch.optim.Optimizer`` subclasses, and a factory from the config."""

from __future__ import annotations

import logging
from typing import Any, Iterable

from dist_bnn.config import SamplerConfig
from dist_bnn.samplers.base import NOISE_STATE_KEY, SGMCMC
from dist_bnn.samplers.sghmc import SGHMC
from dist_bnn.samplers.sgld import SGLD

__all__ = ["NOISE_STATE_KEY", "SGHMC", "SGLD", "SGMCMC", "build_sampler"]

logger = logging.getLogger(__name__)


def build_sampler(cfg: SamplerConfig, params: Iterable[Any], num_data: int, noise_seed: int) -> SGMCMC:
    """Build the sampler named by ``cfg.name``. Build it on every rank with the same seed."""
    common = dict(
        lr=cfg.lr,
        num_data=num_data,
        temperature=cfg.temperature,
        prior_std=cfg.prior_std,
        noise_seed=noise_seed,
    )
    if cfg.name == "sgld":
        if cfg.momentum != SamplerConfig.momentum:
            logger.warning("sampler.momentum=%g is ignored by sampler.name=sgld", cfg.momentum)
        return SGLD(params, **common)
    if cfg.name == "sghmc":
        return SGHMC(params, momentum=cfg.momentum, **common)
    raise ValueError(f"unknown sampler {cfg.name!r}; allowed: sgld, sghmc")
