"""Bayesian model average (BMA) of posterior samples, streamed from disk.

The predictive distribution is the average ``p(y | x) = (1/S) sum_s p(y | x, theta_s)``,
computed in log space where it is a density (``logsumexp_s log p(y | x, theta_s) - log S``):
the likelihood (:mod:`dist_bnn.likelihoods`) defines each sample's statistics and how they
combine. One sample is in memory at a time, so memory grows with the evaluated data, not with
the number of samples.

Two ways to use several ranks: :func:`evaluate_bma` splits the data (every rank reads every
sample), :func:`stream_bma_by_num_samples` splits the samples (every rank predicts all data).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

import ignite.distributed as idist
import torch
from torch import nn
from torch.utils.data import DataLoader

from dist_bnn import distributed
from dist_bnn.evaluation.metrics import metric_sums
from dist_bnn.likelihoods import Likelihood


@torch.no_grad()
def evaluate_weights(
    model: nn.Module, loader: DataLoader, device: torch.device, likelihood: Likelihood
) -> dict[str, float]:
    """Validation metrics of one set of weights over all ranks' shards: accuracy and NLL, or
    RMSE and NLL. Every rank must call this.

    Pass the unwrapped module: a DDP forward may wait for the other ranks.
    """
    was_training = model.training
    model.eval()
    sums = metric_sums(likelihood, device)
    for features, targets in loader:
        features, targets = features.to(device), targets.to(device)
        statistics = likelihood.statistics(model(features), targets)
        sums.update(likelihood.predictive(statistics, 1), targets)
    model.train(was_training)
    return sums.compute()


@torch.no_grad()
def evaluate_bma(
    model: nn.Module,
    sample_paths: Iterable[Path],
    loader: DataLoader,
    device: torch.device,
    likelihood: Likelihood,
) -> dict[str, float]:
    """Validation metrics of the BMA over ``sample_paths``. Every rank must call this.

    Each rank evaluates its own shard of ``loader``'s data with every sample; the sums are then
    reduced over ranks. ``model`` is an unwrapped module of the samples' architecture; its
    weights are overwritten.
    """
    model.eval()
    batches = [(x.to(device), y.to(device)) for x, y in loader]
    accumulated = [likelihood.empty(len(y), device) for _, y in batches]
    num_samples = 0
    for path in sample_paths:
        model.load_state_dict(torch.load(path, weights_only=True, map_location=device))
        num_samples += 1
        for i, (features, targets) in enumerate(batches):
            statistics = likelihood.statistics(model(features), targets)
            accumulated[i] = likelihood.reduce(torch.stack([accumulated[i], statistics]))
    if num_samples == 0:
        raise ValueError("no posterior samples to average")

    sums = metric_sums(likelihood, device)
    for (_, targets), total in zip(batches, accumulated):
        sums.update(likelihood.predictive(total, num_samples), targets)
    metrics = sums.compute()
    metrics["num_samples"] = num_samples
    return metrics


@torch.no_grad()
def stream_bma_by_num_samples(
    model: nn.Module,
    sample_paths: Sequence[Path],
    features: torch.Tensor,
    targets: torch.Tensor,
    likelihood: Likelihood,
    batch_size: int,
    visit: Callable[[int, torch.Tensor], None],
) -> None:
    """Compute the BMA of the first k samples for every k, splitting the samples over ranks.
    Every rank must call this.

    With W ranks, rank r reads samples r, r + W, r + 2W, ... of ``sample_paths``, one file at a
    time, and keeps the running combination of their statistics on all of ``features``. After
    every round of W samples the ranks all-gather these accumulators, so every rank can
    combine the BMA of each prefix of the round. Memory use is one sample's weights plus three
    ``[W, examples, K]`` float64 tensors, whatever the number of samples.

    Args:
        model: unwrapped module of the samples' architecture, on the device to use; its
            weights are overwritten.
        sample_paths: tensor-only state dicts, in the order that defines "the first k".
        features: ``[examples, features]`` inputs, the same on every rank.
        targets: ``[examples]`` targets as the data set stores them.
        likelihood: defines the statistics, their combination and the predictive.
        batch_size: examples per forward pass.
        visit: called on every rank with ``(k, predictive)`` for k = 1, ..., S in order, where
            ``predictive`` is :meth:`Likelihood.predictive` of the first k samples.
    """
    if len(sample_paths) == 0:
        raise ValueError("no posterior samples to average")
    world_size, rank = distributed.world_size(), distributed.rank()
    device = next(model.parameters()).device
    model.eval()
    batches = list(zip(features.to(device).split(batch_size), targets.to(device).split(batch_size)))

    # A rank that has read no sample yet contributes the neutral element.
    local = likelihood.empty(len(features), device)
    previous = local.unsqueeze(0).expand(world_size, -1, -1)
    for first in range(0, len(sample_paths), world_size):
        # In the last round ranks past the end read nothing but still enter the all-gather.
        if first + rank < len(sample_paths):
            statistics = _predict_statistics(model, sample_paths[first + rank], batches, likelihood, device)
            local = likelihood.reduce(torch.stack([local, statistics]))
        current = _all_gather_stacked(local)

        # Prefix k = first + j: ranks below j have added their sample of this round, ranks from
        # j on contribute their accumulator of the previous round.
        for j in range(1, min(world_size, len(sample_paths) - first) + 1):
            num_samples = first + j
            accumulated = likelihood.reduce(torch.cat([current[:j], previous[j:]]))
            visit(num_samples, likelihood.predictive(accumulated, num_samples))
        previous = current


def _predict_statistics(
    model: nn.Module,
    path: Path,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    likelihood: Likelihood,
    device: torch.device,
) -> torch.Tensor:
    model.load_state_dict(torch.load(path, weights_only=True, map_location=device))
    return torch.cat([likelihood.statistics(model(features), targets) for features, targets in batches])


def _all_gather_stacked(tensor: torch.Tensor) -> torch.Tensor:
    """Stack every rank's ``tensor`` into ``[world_size, *tensor.shape]``, in rank order. Every
    rank must call this."""
    if distributed.world_size() == 1:
        return tensor.unsqueeze(0)
    return idist.all_gather(tensor.unsqueeze(0))
