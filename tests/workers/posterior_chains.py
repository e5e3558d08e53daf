"""Bayesian linear regression chains for the Gaussian-posterior tests, on one rank or several.

The model is ``y = x . w + e`` with ``e ~ N(0, NOISE_STD^2)`` and the prior
``w ~ N(0, PRIOR_STD^2 I)``, so the posterior is Gaussian with precision
``X^T X / NOISE_STD^2 + I / PRIOR_STD^2``. NUM_CHAINS independent chains run side by side as
the rows of one parameter, each with its own noise and the same data.

Usage, one process per rank (gloo over loopback, rendezvous through a file):
    posterior_chains.py RANK WORLD_SIZE RENDEZVOUS_FILE OUT_FILE
It runs every sampler of SAMPLER_RUNS and saves ``{name: run_chains(...)}`` to OUT_FILE.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dist_bnn.samplers import SGHMC, SGLD, SGMCMC

NUM_DATA = 32
NUM_FEATURES = 3
NOISE_STD = 1.0
PRIOR_STD = 1.0
TRUE_WEIGHTS = (1.0, -0.5, 0.25)
DATA_SEED = 7
NOISE_SEED = 1234

NUM_CHAINS = 10_000
NUM_STEPS = 1_000
# The kinetic temperature is averaged over this many final steps of the chains.
KINETIC_STEPS = 300

# Step sizes small enough that the discretisation bias stays near 1% (see test_posterior.py),
# and large enough that NUM_STEPS spans 10 relaxation times of the slowest direction.
SGLD_LR = 0.02
SGHMC_LR = 0.005
SGHMC_MOMENTUM = 0.98

# Sampler and temperature of each run that the 2-rank job makes.
SAMPLER_RUNS = (("sgld", 1.0), ("sghmc", 1.0))


def regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Return the fixed ``[NUM_DATA, NUM_FEATURES]`` inputs and ``[NUM_DATA]`` targets."""
    generator = torch.Generator().manual_seed(DATA_SEED)
    features = torch.randn(NUM_DATA, NUM_FEATURES, generator=generator, dtype=torch.float64)
    weights = torch.tensor(TRUE_WEIGHTS, dtype=torch.float64)
    targets = features @ weights + NOISE_STD * torch.randn(NUM_DATA, generator=generator, dtype=torch.float64)
    return features, targets


def posterior_precision() -> torch.Tensor:
    """Return the ``[NUM_FEATURES, NUM_FEATURES]`` precision of the posterior at temperature 1."""
    features, _ = regression_data()
    return features.T @ features / NOISE_STD**2 + torch.eye(NUM_FEATURES, dtype=torch.float64) / PRIOR_STD**2


def posterior(temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the mean and covariance of the tempered posterior ``p(w | D)^(1/T)``."""
    features, targets = regression_data()
    covariance = torch.linalg.inv(posterior_precision())
    mean = covariance @ features.T @ targets / NOISE_STD**2
    return mean, temperature * covariance


def build(name: str, theta: nn.Parameter, temperature: float) -> SGMCMC:
    common = dict(num_data=NUM_DATA, temperature=temperature, prior_std=PRIOR_STD, noise_seed=NOISE_SEED)
    if name == "sgld":
        return SGLD([theta], lr=SGLD_LR, **common)
    return SGHMC([theta], lr=SGHMC_LR, momentum=SGHMC_MOMENTUM, **common)


def run_chains(name: str, temperature: float, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
    """Run NUM_CHAINS chains of sampler ``name`` for NUM_STEPS steps from w = 0.

    Each rank computes the mean-loss gradient on its contiguous share of the data (half of the
    global batch, the whole data set, at world size 2), and the ranks average it with an
    all-reduce as DDP does. Every rank must call this under a process group when
    ``world_size > 1``.

    Returns:
        ``theta``: ``[NUM_CHAINS, NUM_FEATURES]`` final states. ``kinetic_temperature``: for
        SGHMC, ``mean(v^2) * N / lr`` over all chains, coordinates and the last KINETIC_STEPS
        steps, where ``v`` is the velocity and ``lr / N`` the step size on the potential.
    """
    features, targets = regression_data()
    share = NUM_DATA // world_size
    features, targets = features[rank * share : (rank + 1) * share], targets[rank * share : (rank + 1) * share]
    # The shard's sum of squared residuals is w^T A w - 2 b^T w + c: the loss of every chain
    # costs O(NUM_FEATURES^2) instead of a pass over the data.
    gram, moment, target_square_sum = features.T @ features, features.T @ targets, targets @ targets
    theta = nn.Parameter(torch.zeros(NUM_CHAINS, NUM_FEATURES, dtype=torch.float64))
    sampler = build(name, theta, temperature)

    kinetic_sum = torch.zeros((), dtype=torch.float64)
    for step in range(NUM_STEPS):
        sampler.zero_grad(set_to_none=True)
        # Sum over chains of each chain's mean negative log-likelihood on this shard, so row k
        # of the gradient is chain k's mean-loss gradient.
        squared_residuals = ((theta @ gram) * theta).sum(dim=1) - 2 * theta @ moment + target_square_sum
        loss = squared_residuals.sum() / (2 * NOISE_STD**2 * share)
        loss.backward()
        if world_size > 1:
            dist.all_reduce(theta.grad)
            theta.grad.div_(world_size)
        sampler.step()
        if name == "sghmc" and step >= NUM_STEPS - KINETIC_STEPS:
            velocity = sampler.state[theta]["momentum_buffer"]
            kinetic_sum += velocity.pow(2).mean() * NUM_DATA / SGHMC_LR
    return {"theta": theta.detach().clone(), "kinetic_temperature": kinetic_sum / KINETIC_STEPS}


def main(rank: int, world_size: int, rendezvous: Path, out_file: Path) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size
    )
    try:
        results = {name: run_chains(name, temperature, rank, world_size) for name, temperature in SAMPLER_RUNS}
        torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
