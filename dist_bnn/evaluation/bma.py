"""Bayesian model average (BMA) of posterior samples, streamed from disk.

The predictive distribution is ``p(y | x) = (1/S) sum_s softmax(f(x; theta_s))``, computed in
log space as ``logsumexp_s log_softmax(f(x; theta_s)) - log S``. One sample is in memory at a
time, so memory grows with the evaluated data, not with the number of samples.

Two ways to use several ranks: :func:`evaluate_bma` splits the data (every rank reads every
sample), :func:`stream_bma_by_num_samples` splits the samples (every rank predicts all data).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable, Sequence

import ignite.distributed as idist
import torch
from torch import nn
from torch.utils.data import DataLoader

from dist_bnn import distributed
from dist_bnn.evaluation.metrics import ClassificationSums


@torch.no_grad()
def evaluate_weights(model: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Accuracy and NLL of one set of weights over all ranks' shards. Every rank must call this.

    Pass the unwrapped module: a DDP forward may wait for the other ranks.
    """
    was_training = model.training
    model.eval()
    sums = ClassificationSums(device)
    for features, targets in loader:
        features, targets = features.to(device), targets.to(device)
        sums.update(torch.log_softmax(model(features), dim=1), targets)
    model.train(was_training)
    return sums.compute()


@torch.no_grad()
def evaluate_bma(
    model: nn.Module, sample_paths: Iterable[Path], loader: DataLoader, device: torch.device
) -> dict[str, float]:
    """Accuracy and NLL of the BMA over ``sample_paths``. Every rank must call this.

    Each rank evaluates its own shard of ``loader``'s data with every sample; the sums are then
    reduced over ranks. ``model`` is an unwrapped module of the samples' architecture; its
    weights are overwritten.
    """
    model.eval()
    batches = [(x.to(device), y.to(device)) for x, y in loader]
    log_sum: list[torch.Tensor | None] = [None] * len(batches)
    num_samples = 0
    for path in sample_paths:
        model.load_state_dict(torch.load(path, weights_only=True, map_location=device))
        num_samples += 1
        for i, (features, _) in enumerate(batches):
            log_probs = torch.log_softmax(model(features).double(), dim=1)
            log_sum[i] = log_probs if log_sum[i] is None else torch.logaddexp(log_sum[i], log_probs)
    if num_samples == 0:
        raise ValueError("no posterior samples to average")

    sums = ClassificationSums(device)
    for (_, targets), accumulated in zip(batches, log_sum):
        sums.update(accumulated - math.log(num_samples), targets)
    metrics = sums.compute()
    metrics["num_samples"] = num_samples
    return metrics


@torch.no_grad()
def stream_bma_by_num_samples(
    model: nn.Module,
    sample_paths: Sequence[Path],
    features: torch.Tensor,
    num_classes: int,
    batch_size: int,
    visit: Callable[[int, torch.Tensor], None],
) -> None:
    """Compute the BMA of the first k samples for every k, splitting the samples over ranks.
    Every rank must call this.

    With W ranks, rank r reads samples r, r + W, r + 2W, ... of ``sample_paths``, one file at a
    time, and keeps the running log-sum-exp of their log predictive probabilities on all of
    ``features``. After every round of W samples the ranks all-gather these accumulators, so
    every rank can combine the BMA of each prefix of the round. Memory use is one sample's
    weights plus three ``[W, examples, classes]`` float64 tensors, whatever the number of
    samples.

    Args:
        model: unwrapped module of the samples' architecture, on the device to use; its
            weights are overwritten.
        sample_paths: tensor-only state dicts, in the order that defines "the first k".
        features: ``[examples, features]`` inputs, the same on every rank.
        num_classes: number of output logits.
        batch_size: examples per forward pass.
        visit: called on every rank with ``(k, log_probs)`` for k = 1, ..., S in order, where
            ``log_probs`` is ``[examples, classes]`` float64: the log predictive probabilities
            of the BMA of the first k samples.
    """
    if len(sample_paths) == 0:
        raise ValueError("no posterior samples to average")
    world_size, rank = distributed.world_size(), distributed.rank()
    device = next(model.parameters()).device
    model.eval()
    batches = features.to(device).split(batch_size)

    # -inf is the log-sum-exp of no terms: a rank that has read no sample yet adds nothing.
    local = torch.full((len(features), num_classes), -math.inf, dtype=torch.float64, device=device)
    previous = local.unsqueeze(0).expand(world_size, -1, -1)
    for first in range(0, len(sample_paths), world_size):
        # In the last round ranks past the end read nothing but still enter the all-gather.
        if first + rank < len(sample_paths):
            sample_log_probs = _predict_log_probs(model, sample_paths[first + rank], batches, device)
            local = torch.logaddexp(local, sample_log_probs)
        current = _all_gather_stacked(local)

        # Prefix k = first + j: ranks below j have added their sample of this round, ranks from
        # j on contribute their accumulator of the previous round.
        for j in range(1, min(world_size, len(sample_paths) - first) + 1):
            num_samples = first + j
            accumulated = torch.logsumexp(torch.cat([current[:j], previous[j:]]), dim=0)
            visit(num_samples, accumulated - math.log(num_samples))
        previous = current


def _predict_log_probs(
    model: nn.Module, path: Path, batches: Sequence[torch.Tensor], device: torch.device
) -> torch.Tensor:
    model.load_state_dict(torch.load(path, weights_only=True, map_location=device))
    return torch.cat([torch.log_softmax(model(features).double(), dim=1) for features in batches])


def _all_gather_stacked(tensor: torch.Tensor) -> torch.Tensor:
    """Stack every rank's ``tensor`` into ``[world_size, *tensor.shape]``, in rank order. Every
    rank must call this."""
    if distributed.world_size() == 1:
        return tensor.unsqueeze(0)
    return idist.all_gather(tensor.unsqueeze(0))
