"""Statistical tests of SGLD and SGHMC against a posterior with a closed form.

Bayesian linear regression with a Gaussian prior and known noise (tests/workers/posterior_chains.py)
has a Gaussian posterior. The real sampler classes run NUM_CHAINS independent chains from w = 0,
in this process (world size 1) and as two gloo processes over loopback that each hold half of the
global batch, average their gradients with an all-reduce as DDP does, and draw the same noise.

The global batch is the whole data set, so the gradient is exact: the tests isolate the
sampler's update rule, its noise and its behaviour under data parallelism. How each tolerance
was chosen:
- Monte Carlo error: the chains are independent, so the sample mean and covariance have known
  standard errors; each bound allows MONTE_CARLO_Z of them.
- Discretisation bias: a finite step size samples a slightly wider Gaussian than the posterior.
  The chains are linear, so the exact stationary covariance of the discretised chain solves a
  discrete Lyapunov equation. test_discretisation_bias_bounded checks that it lies within
  DISCRETISATION_BOUND of the posterior, and the sample checks add that bound.
- Burn-in: NUM_STEPS spans at least 10 relaxation times of the slowest direction, which leaves
  under e^-10 of the start's distance (at most 6 posterior standard deviations here); the
  bounds ignore this 3e-4.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LAUNCH_TIMEOUT_S, make_env
from workers import posterior_chains as chains
from workers.posterior_chains import NUM_CHAINS, NUM_FEATURES, SAMPLER_RUNS, posterior, run_chains

WORKER = Path(chains.__file__)
SAMPLERS = [name for name, _ in SAMPLER_RUNS]
TEMPERED = 0.5

# Standard errors of the Monte Carlo estimates that a bound allows.
MONTE_CARLO_Z = 4.0
# Maximum relative difference between the discretised chain's exact stationary covariance and
# the posterior covariance, measured in correlation units (entry ij divided by
# sqrt(Sigma_ii Sigma_jj)). SGLD with SGLD_LR reaches 1.5%, SGHMC 0.1%.
DISCRETISATION_BOUND = 0.02
# Maximum error of the sample mean, in posterior standard deviations: the standard error of a
# mean of NUM_CHAINS independent draws is 1 / sqrt(NUM_CHAINS) of them.
MEAN_TOLERANCE = MONTE_CARLO_Z / math.sqrt(NUM_CHAINS)
# Maximum error of each sample-covariance entry in correlation units: discretisation plus
# Monte Carlo, whose standard error is sqrt((1 + rho^2) / NUM_CHAINS) <= sqrt(2 / NUM_CHAINS).
COVARIANCE_TOLERANCE = DISCRETISATION_BOUND + MONTE_CARLO_Z * math.sqrt(2 / NUM_CHAINS)
# Maximum relative error of the overall scale, the mean of |z|^2 / NUM_FEATURES for the
# whitened samples z = L^-1 (w - mean): discretisation plus Monte Carlo, whose standard error
# is sqrt(2 / (NUM_CHAINS * NUM_FEATURES)). A temperature off by 10% fails it.
SCALE_TOLERANCE = DISCRETISATION_BOUND + MONTE_CARLO_Z * math.sqrt(2 / (NUM_CHAINS * NUM_FEATURES))
# Maximum relative distance of SGHMC's kinetic temperature from the configured temperature.
# The discretised velocity's stationary variance exceeds lr * T / N by the factor
# 1 / (1 - friction / 2) for a free particle, 1% at momentum 0.98. Monte Carlo adds
# MONTE_CARLO_Z standard errors of a mean of NUM_CHAINS * NUM_FEATURES squared Gaussians, and
# averaging over the last KINETIC_STEPS steps can only shrink that error.
KINETIC_TOLERANCE = 0.015 + MONTE_CARLO_Z * math.sqrt(2 / (NUM_CHAINS * NUM_FEATURES))
# Maximum absolute difference between world sizes 1 and 2 of the final weights, which are of
# order 1. Half-batch means averaged over two ranks round differently from the full-batch mean,
# by about 1e-16 per step, and the chains contract, so rounding does not grow over the run.
WORLD_SIZE_TOLERANCE = 1e-12


@pytest.fixture(scope="module")
def one_thread():
    """Run the in-process chains on one thread, as the launched ranks do. On a loaded 2-core
    machine, torch's intra-op threads made these small-tensor chains about 30 times slower in
    one measurement."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def one_rank(one_thread) -> dict[str, dict[str, torch.Tensor]]:
    return {name: run_chains(name, temperature) for name, temperature in SAMPLER_RUNS}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Run every sampler of SAMPLER_RUNS on two gloo processes; return each rank's results."""
    root = tmp_path_factory.mktemp("posterior")
    env = make_env(root)
    outputs = [root / f"rank_{rank}.pt" for rank in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), "2", str(root / "rendezvous"), str(outputs[rank])],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(2)
    ]
    for rank, process in enumerate(processes):
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
        assert process.returncode == 0, f"rank {rank} exit {process.returncode}\n{output[-4000:]}"
    return [torch.load(path, weights_only=True) for path in outputs]


def results_at(world_size: int, one_rank, two_ranks) -> dict[str, dict[str, torch.Tensor]]:
    return one_rank if world_size == 1 else two_ranks[0]


def correlation_units(matrix: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """Divide entry ij of ``matrix`` by sqrt(covariance_ii covariance_jj)."""
    std = covariance.diagonal().sqrt()
    return matrix / torch.outer(std, std)


def assert_matches_posterior(theta: torch.Tensor, temperature: float) -> None:
    """Check the ``[chains, features]`` samples against the tempered closed-form posterior."""
    mean, covariance = posterior(temperature)
    std = covariance.diagonal().sqrt()

    mean_error = ((theta.mean(dim=0) - mean) / std).abs().max().item()
    assert mean_error < MEAN_TOLERANCE, f"sample mean off by {mean_error:.4f} posterior stds"

    sample_covariance = torch.cov(theta.T)
    covariance_error = correlation_units(sample_covariance - covariance, covariance).abs().max().item()
    assert covariance_error < COVARIANCE_TOLERANCE, f"sample covariance off by {covariance_error:.4f}"

    whitened = torch.linalg.solve_triangular(
        torch.linalg.cholesky(covariance), (theta - mean).T, upper=False
    )
    scale = whitened.pow(2).mean().item()
    assert abs(scale - 1) < SCALE_TOLERANCE, f"overall scale {scale:.4f}, expected 1"


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("name", SAMPLERS)
def test_samples_match_posterior(name: str, world_size: int, one_rank, two_ranks) -> None:
    theta = results_at(world_size, one_rank, two_ranks)[name]["theta"]

    assert_matches_posterior(theta, temperature=1.0)


@pytest.mark.parametrize("world_size", [1, 2])
def test_sghmc_kinetic_temperature(world_size: int, one_rank, two_ranks) -> None:
    kinetic = results_at(world_size, one_rank, two_ranks)["sghmc"]["kinetic_temperature"].item()

    assert abs(kinetic - 1.0) < KINETIC_TOLERANCE, f"kinetic temperature {kinetic:.4f}"


def test_sghmc_tempered_posterior(one_thread) -> None:
    """At temperature 0.5 the samples follow p(w | D)^2 and the kinetic temperature is 0.5."""
    result = run_chains("sghmc", TEMPERED)

    assert_matches_posterior(result["theta"], TEMPERED)
    kinetic = result["kinetic_temperature"].item()
    assert abs(kinetic / TEMPERED - 1) < KINETIC_TOLERANCE, f"kinetic temperature {kinetic:.4f}"


@pytest.mark.parametrize("name", SAMPLERS)
def test_world_sizes_agree(name: str, one_rank, two_ranks) -> None:
    rank0, rank1 = (results[name]["theta"] for results in two_ranks)

    assert torch.equal(rank0, rank1), "the two ranks hold different weights"
    difference = (rank0 - one_rank[name]["theta"]).abs().max().item()
    assert difference < WORLD_SIZE_TOLERANCE, f"world sizes 1 and 2 differ by {difference:.3g}"


# ---------------------------------------------------------------------------------------------
# The discretisation bias that the tolerances above allow for


def stationary_covariance(transition: torch.Tensor, noise_covariance: torch.Tensor) -> torch.Tensor:
    """Solve ``P = A P A^T + Q`` for the stationary covariance of ``z <- A z + noise``."""
    size = transition.shape[0]
    identity = torch.eye(size * size, dtype=transition.dtype)
    flat = torch.linalg.solve(identity - torch.kron(transition, transition), noise_covariance.reshape(-1))
    return flat.reshape(size, size)


def discretised_covariance(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return the exact stationary covariance of the weights (and of the SGHMC velocity) of the
    discretised chain at temperature 1, from the update rules in the sampler modules."""
    precision = chains.posterior_precision()  # the Hessian of the potential U
    identity = torch.eye(NUM_FEATURES, dtype=torch.float64)
    if name == "sgld":
        step = chains.SGLD_LR / chains.NUM_DATA
        covariance = stationary_covariance(identity - step * precision, 2 * step * identity)
        return covariance, None
    # SGHMC on z = (w, v): v' = m v - eta H (w - mean) + xi, w' = w + v'.
    step, momentum = chains.SGHMC_LR / chains.NUM_DATA, chains.SGHMC_MOMENTUM
    transition = torch.cat(
        [
            torch.cat([identity - step * precision, momentum * identity], dim=1),
            torch.cat([-step * precision, momentum * identity], dim=1),
        ]
    )
    noise = 2 * (1 - momentum) * step * torch.ones(2, 2, dtype=torch.float64).kron(identity)
    joint = stationary_covariance(transition, noise)
    return joint[:NUM_FEATURES, :NUM_FEATURES], joint[NUM_FEATURES:, NUM_FEATURES:]


@pytest.mark.parametrize("name", SAMPLERS)
def test_discretisation_bias_bounded(name: str) -> None:
    _, covariance = posterior()
    discretised, velocity = discretised_covariance(name)

    bias = correlation_units(discretised - covariance, covariance).abs().max().item()
    assert bias < DISCRETISATION_BOUND, f"{name}: stationary covariance off by {bias:.4f}"
    if velocity is not None:
        kinetic = velocity.diagonal().mean().item() * chains.NUM_DATA / chains.SGHMC_LR
        assert abs(kinetic - 1) < 0.015, f"exact kinetic temperature {kinetic:.4f}"
