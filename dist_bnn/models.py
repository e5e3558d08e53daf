"""Network architectures, and the model that a configuration and its data set call for."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from dist_bnn.config import Config
from dist_bnn.data import Splits

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


class MLP(nn.Sequential):
    """Fully connected network: ``in_features -> hidden_sizes... -> out_features`` logits."""

    def __init__(
        self, in_features: int, hidden_sizes: Sequence[int], out_features: int, activation: str = "relu"
    ) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), _ACTIVATIONS[activation]()]
            width = hidden
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)


class LogNoiseStd(nn.Module):
    """Inferred log noise standard deviation with the prior ``N(prior_loc, prior_scale^2)``.

    The samplers put the prior ``N(0, weight_prior_std^2)`` on every parameter. The parameter
    here is a latent ``z`` under that prior, and
    ``log sigma = prior_loc + (prior_scale / weight_prior_std) * z``, so ``log sigma`` has
    exactly the prior ``N(prior_loc, prior_scale^2)``. The map is affine, so the posterior of
    ``log sigma`` is unchanged by it. Being a parameter, ``z`` is sampled with the weights and
    travels in checkpoints, sample files and exports. ``z`` starts at 0, the prior median.
    """

    def __init__(self, prior_loc: float, prior_scale: float, weight_prior_std: float) -> None:
        super().__init__()
        self.prior_loc = prior_loc
        self.scale = prior_scale / weight_prior_std
        self.latent = nn.Parameter(torch.zeros(1))

    def forward(self) -> torch.Tensor:
        """Return ``log sigma`` as a one-element tensor, in standardised target units."""
        return self.prior_loc + self.scale * self.latent


class GaussianMLP(nn.Module):
    """MLP predicting a Gaussian's mean, and its log standard deviation when that is inferred.

    Returns ``[batch, 1]`` (the mean) or ``[batch, 2]`` (mean and log standard deviation, the
    second column the same for every example). The log standard deviation passes through
    ``forward`` so that DDP all-reduces its gradient like any other.
    """

    def __init__(
        self, in_features: int, hidden_sizes: Sequence[int], activation: str, log_noise_std: LogNoiseStd | None
    ) -> None:
        super().__init__()
        self.mean = MLP(in_features, hidden_sizes, 1, activation)
        self.log_noise_std = log_noise_std

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        mean = self.mean(features)
        if self.log_noise_std is None:
            return mean
        return torch.cat([mean, self.log_noise_std().expand(len(mean), 1)], dim=1)


def build_model(cfg: Config, splits: Splits) -> nn.Module:
    """Build the network for ``splits``: logits for classification, a :class:`GaussianMLP` for
    regression. Parameters are drawn from torch's global generator; seed it first."""
    if splits.num_classes is not None:
        return MLP(splits.num_features, cfg.model.hidden_sizes, splits.num_classes, cfg.model.activation)
    likelihood = cfg.likelihood
    log_noise_std = None
    if likelihood.noise == "inferred":
        # The prior median in standardised units: noise_std / target_std, or 1 without one.
        median = 1.0 if likelihood.noise_std is None else likelihood.noise_std / splits.target_std
        log_noise_std = LogNoiseStd(math.log(median), likelihood.log_noise_prior_std, cfg.sampler.prior_std)
    return GaussianMLP(splits.num_features, cfg.model.hidden_sizes, cfg.model.activation, log_noise_std)
