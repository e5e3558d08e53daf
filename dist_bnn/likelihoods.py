"""Likelihoods: the training loss and the per-sample terms of the Bayesian model average.

A likelihood turns the network's outputs into

- the training loss, the mean negative log-likelihood of a mini-batch (the ``L`` of the
  samplers' potential ``N * L(theta) + |theta|^2 / (2 prior_std^2)``);
- one posterior sample's *statistics* per example, ``[examples, K]`` float64, which
  :meth:`Likelihood.reduce` combines over samples (in log space where they are densities);
- the *predictive* of S combined samples, from which the evaluation computes its metrics.

:class:`Categorical` serves classification, :class:`Gaussian` regression with a
homoscedastic noise scale, fixed or inferred (see :class:`dist_bnn.models.LogNoiseStd`).
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from dist_bnn.config import Config, LikelihoodConfig
from dist_bnn.data import Splits

logger = logging.getLogger(__name__)

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class Likelihood(ABC):
    """Observation model ``p(y | f(x; theta))`` of one task."""

    task: str
    """``classification`` or ``regression``."""
    num_outputs: int
    """Width of the network's output layer."""

    @abstractmethod
    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return the mean negative log-likelihood of a batch, a differentiable scalar."""

    @abstractmethod
    def statistics(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return one sample's ``[examples, K]`` float64 contribution to the model average."""

    @abstractmethod
    def empty(self, num_examples: int, device: torch.device) -> torch.Tensor:
        """Return the accumulated statistics of zero samples, the neutral element of
        :meth:`reduce`."""

    @abstractmethod
    def reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        """Combine ``[groups, examples, K]`` accumulated statistics of disjoint sets of samples
        into ``[examples, K]``."""

    @abstractmethod
    def predictive(self, accumulated: torch.Tensor, num_samples: int) -> torch.Tensor:
        """Return the predictive of the average of ``num_samples`` accumulated samples."""


class Categorical(Likelihood):
    """Softmax likelihood over ``num_classes`` logits.

    Statistics and predictive are ``[examples, classes]`` log probabilities; the average is
    ``log (1/S) sum_s softmax(f_s) = logsumexp_s log_softmax(f_s) - log S``.
    """

    task = "classification"

    def __init__(self, num_classes: int) -> None:
        self.num_outputs = num_classes

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    def statistics(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(outputs.double(), dim=1)

    def empty(self, num_examples: int, device: torch.device) -> torch.Tensor:
        # -inf is the log-sum-exp of no terms.
        return torch.full((num_examples, self.num_outputs), -math.inf, dtype=torch.float64, device=device)

    def reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(stacked, dim=0)

    def predictive(self, accumulated: torch.Tensor, num_samples: int) -> torch.Tensor:
        return accumulated - math.log(num_samples)


# Columns of the Gaussian statistics and predictive, all in the target's original units. The
# third column is the second moment in the statistics and the variance in the predictive.
LOG_DENSITY, MEAN, SECOND_MOMENT, VARIANCE = 0, 1, 2, 2


class Gaussian(Likelihood):
    """Homoscedastic Gaussian ``y ~ N(mu(x), sigma^2)`` on standardised targets.

    The network predicts ``mu`` in standardised target units. ``log sigma`` is either fixed or
    the network's second output column, an inferred parameter that is the same for every
    example. The loss is computed in standardised units, which only shifts it by
    ``log target_std``.

    Per sample and example the statistics hold, in the target's original units, the log density
    of the target, the mean and the second moment ``mu^2 + sigma^2``. The predictive of S
    samples is the mixture ``(1/S) sum_s N(mu_s, sigma_s^2)``: its log density at the target
    (``logsumexp_s`` minus ``log S``), its mean and its variance.
    """

    task = "regression"

    def __init__(self, target_mean: float, target_std: float, fixed_noise_std: float | None) -> None:
        """``fixed_noise_std`` is in the target's original units, or ``None`` when inferred."""
        self.target_mean, self.target_std = target_mean, target_std
        self.fixed_log_std = None if fixed_noise_std is None else math.log(fixed_noise_std / target_std)
        self.num_outputs = 1 if fixed_noise_std is not None else 2

    def mean_and_log_std(self, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``mu`` and ``log sigma`` per example, in standardised units."""
        mean = outputs[:, 0]
        if self.fixed_log_std is not None:
            return mean, torch.full_like(mean, self.fixed_log_std)
        return mean, outputs[:, 1]

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        mean, log_std = self.mean_and_log_std(outputs)
        return (_HALF_LOG_2PI + log_std + 0.5 * ((targets - mean) * torch.exp(-log_std)) ** 2).mean()

    def to_original_units(self, standardised: torch.Tensor) -> torch.Tensor:
        return self.target_mean + self.target_std * standardised.double()

    def statistics(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        mean, log_std = self.mean_and_log_std(outputs.double())
        mean = self.to_original_units(mean)
        log_std = log_std + math.log(self.target_std)
        residual = (self.to_original_units(targets) - mean) * torch.exp(-log_std)
        log_density = -_HALF_LOG_2PI - log_std - 0.5 * residual**2
        second_moment = mean**2 + torch.exp(2.0 * log_std)
        return torch.stack([log_density, mean, second_moment], dim=1)

    def empty(self, num_examples: int, device: torch.device) -> torch.Tensor:
        accumulated = torch.zeros(num_examples, 3, dtype=torch.float64, device=device)
        accumulated[:, LOG_DENSITY] = -math.inf
        return accumulated

    def reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        log_density = torch.logsumexp(stacked[..., LOG_DENSITY], dim=0)
        moments = stacked[..., MEAN:].sum(dim=0)
        return torch.cat([log_density.unsqueeze(-1), moments], dim=-1)

    def predictive(self, accumulated: torch.Tensor, num_samples: int) -> torch.Tensor:
        mean = accumulated[:, MEAN] / num_samples
        # E[y^2] - E[y]^2 in float64. The clamp removes a negative rounding residue.
        variance = (accumulated[:, SECOND_MOMENT] / num_samples - mean**2).clamp(min=0.0)
        log_density = accumulated[:, LOG_DENSITY] - math.log(num_samples)
        return torch.stack([log_density, mean, variance], dim=1)


def build_likelihood(cfg: Config, splits: Splits) -> Likelihood:
    """Build the likelihood of ``splits``' task from ``cfg.likelihood``."""
    if splits.num_classes is not None:
        if cfg.likelihood != LikelihoodConfig():
            logger.warning(
                "the likelihood.* keys set the Gaussian noise of regression data sets; "
                "data.name=%s is a classification data set and ignores them", cfg.data.name
            )
        return Categorical(splits.num_classes)
    fixed = cfg.likelihood.noise_std if cfg.likelihood.noise == "fixed" else None
    return Gaussian(splits.target_mean, splits.target_std, fixed)
