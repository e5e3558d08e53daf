"""Likelihoods: losses, per-sample statistics, the mixture predictive and the noise prior."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal

from dist_bnn.config import ConfigError, load_config
from dist_bnn.data import load_splits
from dist_bnn.evaluation.metrics import RegressionSums, regression_metrics
from dist_bnn.likelihoods import (
    LOG_DENSITY,
    MEAN,
    VARIANCE,
    Categorical,
    Gaussian,
    build_likelihood,
)
from dist_bnn.models import GaussianMLP, LogNoiseStd, build_model

# Bound between our float64 formulas and torch.distributions or a direct sum evaluated in
# another order: rounding of float64 only.
FLOAT64_REL_TOLERANCE = 1e-12

# Bound between a float32 computation (training loss, model parameters) and the float64
# reference on the same inputs.
FLOAT32_ABS_TOLERANCE = 1e-5

TARGET_MEAN, TARGET_STD = 3.0, 2.5


def random_outputs(num_examples: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(num_examples, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_categorical_loss_is_cross_entropy():
    outputs, targets = random_outputs(7, 4, seed=0), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    assert torch.equal(Categorical(4).loss(outputs, targets), F.cross_entropy(outputs, targets))


def test_categorical_predictive_is_mixture():
    likelihood = Categorical(3)
    targets = torch.zeros(5, dtype=torch.int64)
    samples = [random_outputs(5, 3, seed) for seed in range(4)]
    accumulated = likelihood.empty(5, torch.device("cpu"))
    for outputs in samples:
        accumulated = likelihood.reduce(torch.stack([accumulated, likelihood.statistics(outputs, targets)]))
    expected = torch.stack([torch.softmax(o, dim=1) for o in samples]).mean(dim=0).log()
    torch.testing.assert_close(likelihood.predictive(accumulated, 4), expected, rtol=FLOAT64_REL_TOLERANCE, atol=0)


@pytest.mark.parametrize("fixed_noise_std", [None, 0.7], ids=["inferred", "fixed"])
def test_gaussian_loss_matches_normal(fixed_noise_std):
    likelihood = Gaussian(TARGET_MEAN, TARGET_STD, fixed_noise_std)
    outputs = random_outputs(9, likelihood.num_outputs, seed=1)
    targets = random_outputs(9, 1, seed=2)[:, 0]
    log_std = outputs[:, 1] if fixed_noise_std is None else torch.full((9,), math.log(fixed_noise_std / TARGET_STD), dtype=torch.float64)
    expected = -Normal(outputs[:, 0], log_std.exp()).log_prob(targets).mean()
    assert math.isclose(likelihood.loss(outputs, targets).item(), expected.item(), rel_tol=FLOAT64_REL_TOLERANCE)


def test_gaussian_loss_float32_training():
    likelihood = Gaussian(TARGET_MEAN, TARGET_STD, None)
    outputs, targets = random_outputs(9, 2, seed=3), random_outputs(9, 1, seed=4)[:, 0]
    loss32 = likelihood.loss(outputs.float(), targets.float())
    assert loss32.dtype == torch.float32
    assert abs(loss32.item() - likelihood.loss(outputs, targets).item()) < FLOAT32_ABS_TOLERANCE


def test_gaussian_statistics_in_original_units():
    likelihood = Gaussian(TARGET_MEAN, TARGET_STD, None)
    outputs, targets = random_outputs(6, 2, seed=5), random_outputs(6, 1, seed=6)[:, 0]
    statistics = likelihood.statistics(outputs, targets)
    mean = TARGET_MEAN + TARGET_STD * outputs[:, 0]
    std = TARGET_STD * outputs[:, 1].exp()
    y = TARGET_MEAN + TARGET_STD * targets
    torch.testing.assert_close(statistics[:, LOG_DENSITY], Normal(mean, std).log_prob(y), rtol=FLOAT64_REL_TOLERANCE, atol=0)
    torch.testing.assert_close(statistics[:, MEAN], mean, rtol=FLOAT64_REL_TOLERANCE, atol=0)


def mixture_by_hand(samples: list[torch.Tensor], targets: torch.Tensor) -> tuple[list[float], list[float], list[float]]:
    """Density, mean and variance of ``(1/S) sum_s N(mu_s, sigma_s^2)`` per example, with loops,
    in original units."""
    densities, means, variances = [], [], []
    for i in range(len(targets)):
        y = TARGET_MEAN + TARGET_STD * targets[i].item()
        mus = [TARGET_MEAN + TARGET_STD * s[i, 0].item() for s in samples]
        sigmas = [TARGET_STD * math.exp(s[i, 1].item()) for s in samples]
        density = sum(
            math.exp(-0.5 * ((y - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi)) for mu, sigma in zip(mus, sigmas)
        ) / len(samples)
        mean = sum(mus) / len(samples)
        # Law of total variance: mean of the variances plus the variance of the means.
        variance = sum(sigma**2 for sigma in sigmas) / len(samples) + sum((mu - mean) ** 2 for mu in mus) / len(samples)
        densities.append(math.log(density))
        means.append(mean)
        variances.append(variance)
    return densities, means, variances


def accumulate(likelihood, samples, targets, groups: int) -> torch.Tensor:
    """Accumulate ``samples`` in ``groups`` interleaved groups, then reduce the groups, as ranks do."""
    accumulators = [likelihood.empty(len(targets), torch.device("cpu")) for _ in range(groups)]
    for k, outputs in enumerate(samples):
        group = k % groups
        accumulators[group] = likelihood.reduce(torch.stack([accumulators[group], likelihood.statistics(outputs, targets)]))
    return likelihood.reduce(torch.stack(accumulators))


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_gaussian_predictive_is_mixture(groups):
    likelihood = Gaussian(TARGET_MEAN, TARGET_STD, None)
    samples = [random_outputs(5, 2, seed) for seed in range(10, 15)]
    targets = random_outputs(5, 1, seed=20)[:, 0]
    predictive = likelihood.predictive(accumulate(likelihood, samples, targets, groups), len(samples))
    densities, means, variances = mixture_by_hand(samples, targets)
    torch.testing.assert_close(predictive[:, LOG_DENSITY], torch.tensor(densities, dtype=torch.float64), rtol=FLOAT64_REL_TOLERANCE, atol=0)
    torch.testing.assert_close(predictive[:, MEAN], torch.tensor(means, dtype=torch.float64), rtol=FLOAT64_REL_TOLERANCE, atol=0)
    # E[y^2] - E[y]^2 cancels digits: the bound is relative to the second moment.
    second_moment = max(m * m + v for m, v in zip(means, variances))
    torch.testing.assert_close(
        predictive[:, VARIANCE], torch.tensor(variances, dtype=torch.float64),
        rtol=0, atol=second_moment * FLOAT64_REL_TOLERANCE,
    )


def test_gaussian_log_density_far_tail_finite():
    # Every sample puts the target 60 standard deviations away: the density underflows in
    # linear space (exp(-1800)), but log space keeps it finite.
    likelihood = Gaussian(0.0, 1.0, None)
    samples = [torch.tensor([[0.0, math.log(0.1)]], dtype=torch.float64)] * 3
    predictive = likelihood.predictive(accumulate(likelihood, samples, torch.tensor([6.0]), groups=1), 3)
    expected = Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64)).log_prob(
        torch.tensor(6.0, dtype=torch.float64)
    )
    assert math.isfinite(predictive[0, LOG_DENSITY].item())
    assert math.isclose(predictive[0, LOG_DENSITY].item(), expected.item(), rel_tol=FLOAT64_REL_TOLERANCE)


def test_regression_sums_match_metrics():
    likelihood = Gaussian(TARGET_MEAN, TARGET_STD, 0.5)
    outputs, targets = random_outputs(8, 1, seed=30), random_outputs(8, 1, seed=31)[:, 0]
    predictive = likelihood.predictive(likelihood.statistics(outputs, targets), 1)
    sums = RegressionSums(likelihood, torch.device("cpu"))
    sums.update(predictive[:5], targets[:5])
    sums.update(predictive[5:], targets[5:])
    from_sums = sums.compute()
    whole = regression_metrics(predictive, likelihood.to_original_units(targets))
    assert from_sums["count"] == 8
    assert math.isclose(from_sums["rmse"], whole["rmse"], rel_tol=FLOAT64_REL_TOLERANCE)
    assert math.isclose(from_sums["nll"], -whole["test_ll"], rel_tol=FLOAT64_REL_TOLERANCE)


def test_log_noise_prior_exact():
    # z ~ N(0, weight_prior_std^2) must give log sigma ~ N(prior_loc, prior_scale^2): the map
    # is affine, so its value at z = 0 and z = weight_prior_std pins it down.
    module = LogNoiseStd(prior_loc=-1.5, prior_scale=0.4, weight_prior_std=2.0)
    assert module().item() == -1.5
    with torch.no_grad():
        module.latent.fill_(2.0)
    assert abs(module().item() - (-1.5 + 0.4)) < FLOAT32_ABS_TOLERANCE


def test_inferred_model_outputs_two_columns():
    cfg = load_config(None, ["run.dir=unused", "data.name=toy1d", "model.hidden_sizes=[8]"])
    splits = load_splits(cfg.data, seed=0)
    model = build_model(cfg, splits)
    assert isinstance(model, GaussianMLP)
    assert "log_noise_std.latent" in model.state_dict()
    outputs = model(splits.train.tensors[0][:4])
    assert outputs.shape == (4, 2)
    # The prior median defaults to the training target's standard deviation: log 1 = 0.
    assert torch.equal(outputs[:, 1], torch.zeros(4))
    assert build_likelihood(cfg, splits).num_outputs == 2


def test_fixed_noise_model_one_column():
    cfg = load_config(None, ["run.dir=unused", "data.name=diabetes", "likelihood.noise=fixed", "likelihood.noise_std=50"])
    splits = load_splits(cfg.data, seed=0)
    model, likelihood = build_model(cfg, splits), build_likelihood(cfg, splits)
    assert not any("log_noise_std" in name for name in model.state_dict())
    assert model(splits.train.tensors[0][:3]).shape == (3, 1)
    assert math.isclose(likelihood.fixed_log_std, math.log(50 / splits.target_std), rel_tol=FLOAT64_REL_TOLERANCE)


def test_classification_ignores_likelihood_keys(caplog):
    cfg = load_config(None, ["run.dir=unused", "data.name=wine", "likelihood.noise_std=2"])
    likelihood = build_likelihood(cfg, load_splits(cfg.data, seed=0))
    assert isinstance(likelihood, Categorical)
    assert "data.name=wine is a classification data set and ignores them" in caplog.text


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.name=toy1d", "likelihood.noise=fixed"], "likelihood.noise=fixed needs likelihood.noise_std"),
        (["likelihood.noise=learned"], "likelihood.noise='learned' is not supported; allowed: fixed, inferred"),
        (["likelihood.noise_std=-1"], "likelihood.noise_std=-1.0 is invalid"),
        (["likelihood.log_noise_prior_std=0"], "likelihood.log_noise_prior_std=0.0 is invalid"),
        (["data.name=toy1d", "checkpoint.best_metric=val/accuracy"], "val/accuracy exists for classification data sets only"),
        (["checkpoint.best_metric=val/rmse"], "val/rmse exists for regression data sets only"),
    ],
    ids=["fixed-without-std", "unknown-mode", "negative-std", "zero-prior", "accuracy-on-regression", "rmse-on-classification"],
)
def test_likelihood_config_errors(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, ["run.dir=unused", *overrides])
    assert message in str(error.value)
