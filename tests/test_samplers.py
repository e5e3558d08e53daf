"""Tests of SGLD, SGHMC and pSGLD on CPU tensors, with no process group.

They check the documented update rules, the noise stream that every replica shares and that
survives a checkpoint round trip, and the stationary law of SGLD on a Gaussian target."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from dist_bnn.samplers import NOISE_STATE_KEY, PSGLD, SGHMC, SGLD, SGMCMC

NOISE_SEED = 1234
LR = 0.01
NUM_DATA = 50
PRIOR_STD = 0.7
MOMENTUM = 0.8
DECAY = 0.9
EPSILON = 1e-3
PARAM_SHAPES = [(3, 4), (4,), (2, 2, 3)]

# Maximum absolute difference, per element of float64 values of order 1, between a sampler's
# step and the hand-written reference. It bounds rounding only, because the in-place kernels
# (add_ with alpha) round differently from the reference's separate multiply and add, by a few
# ulps. A noise draw out of order or from another stream differs by about the noise scale,
# 0.009 (SGHMC) to 0.02 (SGLD) here.
ROUNDING_TOLERANCE = 1e-12


def make_params(seed: int = 0) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [
        nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float64))
        for shape in PARAM_SHAPES
    ]


def set_gradients(params: list[nn.Parameter], step: int) -> None:
    """Give every parameter a gradient that depends only on ``step`` and its position."""
    generator = torch.Generator().manual_seed(10_000 + step)
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator, dtype=param.dtype)


def build(
    name: str, params, noise_seed: int = NOISE_SEED, temperature: float = 1.0
) -> SGMCMC:
    common = dict(
        lr=LR, num_data=NUM_DATA, temperature=temperature, prior_std=PRIOR_STD, noise_seed=noise_seed
    )
    if name == "sgld":
        return SGLD(params, **common)
    if name == "psgld":
        return PSGLD(params, decay=DECAY, epsilon=EPSILON, **common)
    return SGHMC(params, momentum=MOMENTUM, **common)


def run_steps(sampler: SGMCMC, params: list[nn.Parameter], steps: range) -> None:
    for step in steps:
        set_gradients(params, step)
        sampler.step()


def snapshot(params) -> list[torch.Tensor]:
    return [param.detach().clone() for param in params]


# ---------------------------------------------------------------------------------------------
# Hand-written references of the rules in the module docstrings of sgld.py, sghmc.py and
# psgld.py


def sgld_reference(
    thetas: list[torch.Tensor], grads: list[torch.Tensor], generator: torch.Generator, temperature: float
) -> list[torch.Tensor]:
    """theta <- theta - lr * (grad L + theta / (N prior_std^2)) + sqrt(2 lr T / N) * xi."""
    noise_std = math.sqrt(2 * LR * temperature / NUM_DATA)
    updated = []
    for theta, grad in zip(thetas, grads):
        potential_grad = grad + theta / (NUM_DATA * PRIOR_STD**2)
        xi = torch.randn(theta.shape, generator=generator, dtype=theta.dtype)
        updated.append(theta - LR * potential_grad + noise_std * xi)
    return updated


def sghmc_reference(
    thetas: list[torch.Tensor],
    velocities: list[torch.Tensor],
    grads: list[torch.Tensor],
    generator: torch.Generator,
    temperature: float,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """v <- m v - lr * (grad L + theta / (N prior_std^2)) + sqrt(2 (1 - m) lr T / N) * xi;
    theta <- theta + v."""
    noise_std = math.sqrt(2 * (1 - MOMENTUM) * LR * temperature / NUM_DATA)
    new_thetas, new_velocities = [], []
    for theta, velocity, grad in zip(thetas, velocities, grads):
        potential_grad = grad + theta / (NUM_DATA * PRIOR_STD**2)
        xi = torch.randn(theta.shape, generator=generator, dtype=theta.dtype)
        velocity = MOMENTUM * velocity - LR * potential_grad + noise_std * xi
        new_velocities.append(velocity)
        new_thetas.append(theta + velocity)
    return new_thetas, new_velocities


def psgld_reference(
    thetas: list[torch.Tensor],
    square_avgs: list[torch.Tensor],
    grads: list[torch.Tensor],
    generator: torch.Generator,
    temperature: float,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """V <- a V + (1 - a) g^2; G = 1 / (eps + sqrt(V)); theta <- theta - lr G g
    + sqrt(2 lr T G / N) * xi, with g = grad L + theta / (N prior_std^2)."""
    new_thetas, new_square_avgs = [], []
    for theta, square_avg, grad in zip(thetas, square_avgs, grads):
        potential_grad = grad + theta / (NUM_DATA * PRIOR_STD**2)
        square_avg = DECAY * square_avg + (1 - DECAY) * potential_grad**2
        preconditioner = 1 / (EPSILON + square_avg.sqrt())
        new_theta = theta - LR * preconditioner * potential_grad
        if temperature > 0:
            xi = torch.randn(theta.shape, generator=generator, dtype=theta.dtype)
            new_theta = new_theta + torch.sqrt(2 * LR * temperature * preconditioner / NUM_DATA) * xi
        new_square_avgs.append(square_avg)
        new_thetas.append(new_theta)
    return new_thetas, new_square_avgs


def reference_trajectory(name: str, num_steps: int, temperature: float) -> list[torch.Tensor]:
    """Parameters after ``num_steps`` steps of the reference rule, from make_params()."""
    generator = torch.Generator().manual_seed(NOISE_SEED)
    thetas = snapshot(make_params())
    buffers = [torch.zeros_like(theta) for theta in thetas]
    for step in range(num_steps):
        grads = [param.grad for param in gradient_holders(thetas, step)]
        if name == "sgld":
            thetas = sgld_reference(thetas, grads, generator, temperature)
        elif name == "psgld":
            thetas, buffers = psgld_reference(thetas, buffers, grads, generator, temperature)
        else:
            thetas, buffers = sghmc_reference(thetas, buffers, grads, generator, temperature)
    return thetas


def gradient_holders(thetas: list[torch.Tensor], step: int) -> list[nn.Parameter]:
    """Return parameters shaped like ``thetas`` that carry set_gradients' gradients of ``step``."""
    holders = [nn.Parameter(torch.zeros_like(theta)) for theta in thetas]
    set_gradients(holders, step)
    return holders


def assert_close_to(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for index, (got, want) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(
            got.detach(), want, rtol=0, atol=ROUNDING_TOLERANCE, msg=f"parameter {index}"
        )


def assert_bitwise_equal(actual, expected) -> None:
    for index, (got, want) in enumerate(zip(actual, expected)):
        assert torch.equal(got.detach(), want.detach()), f"parameter {index} differs"


SAMPLER_NAMES = ["sgld", "sghmc", "psgld"]


# ---------------------------------------------------------------------------------------------
# Update rules


@pytest.mark.parametrize("name", SAMPLER_NAMES)
@pytest.mark.parametrize("num_steps", [1, 7])
def test_step_matches_reference(name: str, num_steps: int) -> None:
    params = make_params()
    sampler = build(name, params)

    run_steps(sampler, params, range(num_steps))

    assert_close_to(params, reference_trajectory(name, num_steps, temperature=1.0))


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_zero_temperature_is_deterministic(name: str) -> None:
    params = make_params()
    sampler = build(name, params, temperature=0.0)

    run_steps(sampler, params, range(3))

    assert_close_to(params, reference_trajectory(name, 3, temperature=0.0))


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_noise_off_matches_zero_temperature(name: str) -> None:
    """A step with ``add_noise`` false (a schedule's exploration phase) is the temperature-0
    step and leaves the noise generator where it was."""
    params = make_params()
    sampler = build(name, params)
    untouched = torch.Generator().manual_seed(NOISE_SEED).get_state()
    for group in sampler.param_groups:
        group["add_noise"] = False

    run_steps(sampler, params, range(3))

    assert_close_to(params, reference_trajectory(name, 3, temperature=0.0))
    assert torch.equal(sampler.state_dict()["state"][0][NOISE_STATE_KEY], untouched)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_zero_temperature_keeps_generator(name: str) -> None:
    params = make_params()
    sampler = build(name, params, temperature=0.0)
    untouched = torch.Generator().manual_seed(NOISE_SEED).get_state()

    run_steps(sampler, params, range(3))

    assert torch.equal(sampler.state_dict()["state"][0][NOISE_STATE_KEY], untouched)


def test_missing_gradient_uses_prior() -> None:
    """A parameter whose .grad is None moves under the prior term and the noise only."""
    params = make_params()
    sampler = build("sgld", params)
    expected = sgld_reference(
        snapshot(params),
        [torch.zeros_like(param) for param in params],
        torch.Generator().manual_seed(NOISE_SEED),
        temperature=1.0,
    )

    sampler.step()

    assert_close_to(params, expected)


# ---------------------------------------------------------------------------------------------
# One noise stream for every replica


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_same_seed_replicas_identical(name: str) -> None:
    first, second = make_params(), make_params()
    first_sampler, second_sampler = build(name, first), build(name, second)

    run_steps(first_sampler, first, range(5))
    run_steps(second_sampler, second, range(5))

    assert_bitwise_equal(first, second)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_other_seed_diverges(name: str) -> None:
    first, second = make_params(), make_params()
    first_sampler = build(name, first)
    second_sampler = build(name, second, noise_seed=NOISE_SEED + 1)

    run_steps(first_sampler, first, range(2))
    run_steps(second_sampler, second, range(2))

    assert not torch.equal(first[0], second[0])


# ---------------------------------------------------------------------------------------------
# Checkpointed state


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_state_dict_round_trip(name: str) -> None:
    params = make_params()
    sampler = build(name, params)
    run_steps(sampler, params, range(3))
    saved_state = copy.deepcopy(sampler.state_dict())
    saved_params = snapshot(params)
    run_steps(sampler, params, range(3, 6))

    restored = [nn.Parameter(value.clone()) for value in saved_params]
    fresh = build(name, restored, noise_seed=NOISE_SEED + 1)
    fresh.load_state_dict(saved_state)
    run_steps(fresh, restored, range(3, 6))

    assert_bitwise_equal(restored, params)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_state_dict_weights_only_load(name: str, tmp_path: Path) -> None:
    params = make_params()
    sampler = build(name, params)
    run_steps(sampler, params, range(3))
    torch.save(sampler.state_dict(), tmp_path / "sampler.pt")
    saved_params = snapshot(params)
    run_steps(sampler, params, range(3, 6))

    loaded_state = torch.load(tmp_path / "sampler.pt", weights_only=True)
    restored = [nn.Parameter(value.clone()) for value in saved_params]
    fresh = build(name, restored, noise_seed=NOISE_SEED + 1)
    fresh.load_state_dict(loaded_state)
    run_steps(fresh, restored, range(3, 6))

    assert_bitwise_equal(restored, params)


def test_load_without_noise_state_fails() -> None:
    params = make_params()
    state = copy.deepcopy(build("sgld", params).state_dict())
    del state["state"][0][NOISE_STATE_KEY]

    with pytest.raises(KeyError, match=NOISE_STATE_KEY):
        build("sgld", make_params()).load_state_dict(state)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).double()


def train_model(model: nn.Module, sampler: SGMCMC, steps: range) -> None:
    """Step on the mean squared error of a fixed batch that depends only on the step index."""
    for step in steps:
        generator = torch.Generator().manual_seed(20_000 + step)
        inputs = torch.randn(8, 4, generator=generator, dtype=torch.float64)
        targets = torch.randn(8, 1, generator=generator, dtype=torch.float64)
        sampler.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        sampler.step()


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_dcp_state_dict_round_trip(name: str) -> None:
    model = make_model(seed=0)
    sampler = build(name, model.parameters())
    train_model(model, sampler, range(3))
    model_state, optim_state = copy.deepcopy(get_state_dict(model, sampler))
    train_model(model, sampler, range(3, 6))

    fresh_model = make_model(seed=1)
    fresh_sampler = build(name, fresh_model.parameters(), noise_seed=NOISE_SEED + 1)
    set_state_dict(
        fresh_model, fresh_sampler, model_state_dict=model_state, optim_state_dict=optim_state
    )
    train_model(fresh_model, fresh_sampler, range(3, 6))

    assert_bitwise_equal(fresh_model.parameters(), model.parameters())


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_dcp_get_keeps_noise_stream(name: str) -> None:
    """get_state_dict on a sampler that never stepped must not advance its noise generator.

    NOTE: torch 2.13's DCP sets lr to 0 for the zero-gradient step() that initialises empty
    optimizer state, which makes the noise scale 0 too. On that version this test passes even
    without the sampler's eager state, so it guards against other torch versions only.
    """
    model, twin = make_model(seed=0), make_model(seed=0)
    sampler = build(name, model.parameters())
    twin_sampler = build(name, twin.parameters())

    get_state_dict(model, sampler)
    train_model(model, sampler, range(1))
    train_model(twin, twin_sampler, range(1))

    assert_bitwise_equal(model.parameters(), twin.parameters())


# ---------------------------------------------------------------------------------------------
# Stationary law of SGLD on a Gaussian target

# The mean loss is L(theta) = (theta - LIKELIHOOD_MEAN)^2 / 2 over GAUSSIAN_NUM_DATA examples and
# the prior is N(0, GAUSSIAN_PRIOR_STD^2), so the posterior is Gaussian with precision
# N + 1 / prior_std^2.
GAUSSIAN_NUM_DATA = 100
GAUSSIAN_PRIOR_STD = 1.0
LIKELIHOOD_MEAN = 0.5
GAUSSIAN_LR = 0.02
NUM_CHAINS = 20_000
NUM_GAUSSIAN_STEPS = 600
# With 20,000 independent chains the standard error of the sample mean is 0.0007, and that of the
# sample variance is 1% of the variance. Each bound is five standard errors.
MEAN_TOLERANCE = 0.0035
VARIANCE_RELATIVE_TOLERANCE = 0.05


def test_sgld_samples_gaussian_posterior() -> None:
    precision = GAUSSIAN_NUM_DATA + 1 / GAUSSIAN_PRIOR_STD**2
    posterior_mean = GAUSSIAN_NUM_DATA * LIKELIHOOD_MEAN / precision
    # SGLD is Euler-Maruyama with step h = lr / N on U = N L + theta^2 / (2 prior_std^2). On a
    # Gaussian its chain is AR(1) with stationary variance 1 / (precision (1 - h precision / 2)),
    # 1% above the posterior's 1 / precision here. The 600 steps shrink the bias of the start
    # at zero by (1 - h precision)^600, about e^-12.
    step_size = GAUSSIAN_LR / GAUSSIAN_NUM_DATA
    stationary_variance = 1 / (precision * (1 - step_size * precision / 2))
    chains = nn.Parameter(torch.zeros(NUM_CHAINS, dtype=torch.float64))
    sampler = SGLD(
        [chains], lr=GAUSSIAN_LR, num_data=GAUSSIAN_NUM_DATA, prior_std=GAUSSIAN_PRIOR_STD,
        noise_seed=NOISE_SEED,
    )

    for _ in range(NUM_GAUSSIAN_STEPS):
        chains.grad = chains.detach() - LIKELIHOOD_MEAN
        sampler.step()

    samples = chains.detach()
    assert abs(samples.mean().item() - posterior_mean) < MEAN_TOLERANCE
    assert abs(samples.var().item() / stationary_variance - 1) < VARIANCE_RELATIVE_TOLERANCE


# ---------------------------------------------------------------------------------------------
# Hyper-parameter checks


BAD_HYPERPARAMETERS = [
    pytest.param(SGLD, dict(lr=0.0), "0 < lr < inf", id="sgld-lr-zero"),
    pytest.param(SGLD, dict(lr=-0.1), "0 < lr < inf", id="sgld-lr-negative"),
    pytest.param(SGHMC, dict(lr=0.0), "0 < lr < inf", id="sghmc-lr-zero"),
    pytest.param(SGHMC, dict(momentum=1.0), "momentum < 1", id="momentum-one"),
    pytest.param(SGHMC, dict(momentum=-0.1), "0 <= momentum", id="momentum-negative"),
    pytest.param(SGLD, dict(temperature=-1.0), "0 <= temperature < inf", id="sgld-temperature-negative"),
    pytest.param(SGHMC, dict(temperature=-1.0), "0 <= temperature < inf", id="sghmc-temperature-negative"),
    pytest.param(SGLD, dict(temperature=math.nan), "0 <= temperature < inf", id="temperature-nan"),
    pytest.param(SGLD, dict(lr=math.inf), "0 < lr < inf", id="lr-infinite"),
    pytest.param(SGLD, dict(prior_std=0.0), "0 < prior_std < inf", id="prior-std-zero"),
    pytest.param(SGHMC, dict(prior_std=-1.0), "0 < prior_std < inf", id="prior-std-negative"),
    pytest.param(SGLD, dict(num_data=0), "num_data >= 1", id="sgld-num-data-zero"),
    pytest.param(SGHMC, dict(num_data=0), "num_data >= 1", id="sghmc-num-data-zero"),
    pytest.param(PSGLD, dict(lr=0.0), "0 < lr < inf", id="psgld-lr-zero"),
    pytest.param(PSGLD, dict(decay=1.0), "decay < 1", id="psgld-decay-one"),
    pytest.param(PSGLD, dict(decay=-0.5), "0 <= decay", id="psgld-decay-negative"),
    pytest.param(PSGLD, dict(epsilon=0.0), "0 < epsilon", id="psgld-epsilon-zero"),
    pytest.param(PSGLD, dict(epsilon=math.nan), "0 < epsilon", id="psgld-epsilon-nan"),
]


@pytest.mark.parametrize(("sampler_class", "bad", "fragment"), BAD_HYPERPARAMETERS)
def test_bad_hyperparameter_rejected(
    sampler_class: Callable[..., SGMCMC], bad: dict, fragment: str
) -> None:
    arguments = {"lr": LR, "num_data": NUM_DATA, **bad}

    with pytest.raises(ValueError, match=fragment):
        sampler_class(make_params(), **arguments)
