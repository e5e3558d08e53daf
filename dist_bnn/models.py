"""Network architectures."""

from __future__ import annotations

from typing import Sequence

from torch import nn

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
