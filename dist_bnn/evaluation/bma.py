"""Bayesian model average (BMA) of posterior samples, streamed from disk.

The predictive distribution is ``p(y | x) = (1/S) sum_s softmax(f(x; theta_s))``, computed in
log space as ``logsumexp_s log_softmax(f(x; theta_s)) - log S``. One sample is in memory at a
time, so memory grows with the evaluated data, not with the number of samples.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader

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
