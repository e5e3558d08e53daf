"""Metrics: sums that add up over data shards, and metrics of a whole set.

:class:`ClassificationSums` and :class:`RegressionSums` accumulate the validation metrics over
the data shards of several ranks. :func:`classification_metrics` computes accuracy, NLL, ECE
and Brier score from the log predictive probabilities of a whole evaluation set held by one
rank, :func:`regression_metrics` the RMSE and test log-likelihood of a Gaussian predictive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dist_bnn import distributed
from dist_bnn.likelihoods import LOG_DENSITY, MEAN, Gaussian, Likelihood


class ClassificationSums:
    """Running sums of correct predictions, negative log-likelihood and example count.

    Sums are float64 so that a metric summed over 1, 2 or 4 ranks agrees to float64 rounding.
    """

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)

    def update(self, log_probs: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch. ``log_probs`` is ``[batch, classes]`` log predictive probabilities."""
        nll = -log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
        correct = (log_probs.argmax(dim=1) == targets).sum()
        self.sums += torch.stack(
            [correct.double(), nll.double().sum(), torch.tensor(float(len(targets)), dtype=torch.float64, device=nll.device)]
        )

    def compute(self) -> dict[str, float]:
        """Return accuracy, mean NLL and the example count over all ranks. Every rank must call
        this."""
        correct, nll, count = distributed.all_reduce_sum(self.sums.clone()).tolist()
        if count == 0:
            raise ValueError("no examples were evaluated")
        return {"accuracy": correct / count, "nll": nll / count, "count": int(count)}


class RegressionSums:
    """Running float64 sums of squared error, negative log predictive density and example
    count, in the target's original units."""

    def __init__(self, likelihood: Gaussian, device: torch.device) -> None:
        self.likelihood = likelihood
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)

    def update(self, predictive: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch: ``predictive`` from :meth:`Gaussian.predictive`, standardised
        ``targets``."""
        squared_error = (predictive[:, MEAN] - self.likelihood.to_original_units(targets)) ** 2
        count = torch.tensor(float(len(targets)), dtype=torch.float64, device=predictive.device)
        self.sums += torch.stack([squared_error.sum(), -predictive[:, LOG_DENSITY].sum(), count])

    def compute(self) -> dict[str, float]:
        """Return RMSE, mean NLL and the example count over all ranks. Every rank must call
        this."""
        squared_error, nll, count = distributed.all_reduce_sum(self.sums.clone()).tolist()
        if count == 0:
            raise ValueError("no examples were evaluated")
        return {"rmse": math.sqrt(squared_error / count), "nll": nll / count, "count": int(count)}


def metric_sums(likelihood: Likelihood, device: torch.device) -> ClassificationSums | RegressionSums:
    """Return empty sums of the validation metrics of ``likelihood``'s task."""
    if isinstance(likelihood, Gaussian):
        return RegressionSums(likelihood, device)
    return ClassificationSums(device)


def regression_metrics(predictive: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Return the RMSE of the predictive mean and the mean log predictive density (test
    log-likelihood) of one set of predictions.

    Args:
        predictive: ``[examples, 3]`` from :meth:`Gaussian.predictive`, original units.
        targets: ``[examples]`` targets in original units.
    """
    if len(targets) == 0:
        raise ValueError("no examples to evaluate")
    squared_error = (predictive[:, MEAN] - targets.double()) ** 2
    return {
        "rmse": math.sqrt(float(squared_error.mean())),
        "test_ll": float(predictive[:, LOG_DENSITY].mean()),
    }


# ---------------------------------------------------------------------------------------------
# Metrics of a whole evaluation set, from log predictive probabilities

ECE_NUM_BINS = 15
"""Number of equal-width confidence bins over [0, 1] for the expected calibration error."""


@dataclass
class CalibrationBins:
    """Counts and sums per confidence bin. Bin ``b`` of ``M`` covers ``(b/M, (b+1)/M]``.

    The confidence of a prediction is its largest predictive probability. Confidences in
    ``[0, 1/M]`` fall into bin 0.
    """

    counts: torch.Tensor
    """``[M]`` int64, number of examples per bin."""
    confidence_sums: torch.Tensor
    """``[M]`` float64, sum of the confidences of the examples in each bin."""
    correct_sums: torch.Tensor
    """``[M]`` float64, number of correctly classified examples in each bin."""

    @property
    def num_bins(self) -> int:
        return len(self.counts)

    def expected_calibration_error(self) -> float:
        """Return the binned expected calibration error
        ``sum_b (n_b / n) |accuracy_b - mean confidence_b|`` over ``n`` examples."""
        total = int(self.counts.sum())
        if total == 0:
            raise ValueError("no examples in the calibration bins")
        # n_b * |accuracy_b - confidence_b| = |correct_b - confidence_sum_b|, so empty bins add 0.
        return float((self.correct_sums - self.confidence_sums).abs().sum()) / total


def calibration_bins(
    log_probs: torch.Tensor, targets: torch.Tensor, num_bins: int = ECE_NUM_BINS
) -> CalibrationBins:
    """Bin examples by confidence.

    Args:
        log_probs: ``[examples, classes]`` log predictive probabilities.
        targets: ``[examples]`` class indices.
        num_bins: number of equal-width bins over [0, 1].
    """
    max_log_prob, predicted = log_probs.double().max(dim=1)
    confidence = max_log_prob.exp()
    correct = (predicted == targets).double()

    # With right=False, bucketize puts x into bin b when edges[b] < x <= edges[b + 1].
    edges = torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64, device=log_probs.device)
    bins = torch.bucketize(confidence, edges[1:-1], right=False)

    zeros = torch.zeros(num_bins, dtype=torch.float64, device=log_probs.device)
    return CalibrationBins(
        counts=torch.bincount(bins, minlength=num_bins).cpu(),
        confidence_sums=zeros.index_add(0, bins, confidence).cpu(),
        correct_sums=zeros.index_add(0, bins, correct).cpu(),
    )


def brier_score(log_probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Return the mean over examples of ``sum_c (p_c - onehot_c)^2``, in [0, 2].

    Args:
        log_probs: ``[examples, classes]`` log predictive probabilities.
        targets: ``[examples]`` class indices.
    """
    probs = log_probs.double().exp()
    onehot = torch.nn.functional.one_hot(targets, num_classes=probs.shape[1]).double()
    return float(((probs - onehot) ** 2).sum(dim=1).mean())


def classification_metrics(log_probs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Return accuracy, mean NLL, ECE (15 bins) and Brier score of one set of predictions.

    Args:
        log_probs: ``[examples, classes]`` log predictive probabilities, for example of a
            Bayesian model average; each row must log-sum-exp to 0.
        targets: ``[examples]`` class indices.
    """
    if len(targets) == 0:
        raise ValueError("no examples to evaluate")
    log_probs = log_probs.double()
    nll = -log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
    return {
        "accuracy": float((log_probs.argmax(dim=1) == targets).double().mean()),
        "nll": float(nll.mean()),
        "ece": calibration_bins(log_probs, targets).expected_calibration_error(),
        "brier": brier_score(log_probs, targets),
    }
