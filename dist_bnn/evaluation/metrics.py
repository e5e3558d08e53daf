"""Classification metrics accumulated as sums, so shards on several ranks add up exactly."""

from __future__ import annotations

import torch

from dist_bnn import distributed


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
