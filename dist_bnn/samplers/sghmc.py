"""Stochastic gradient Hamiltonian Monte Carlo (SGHMC), Chen, Fox and Guestrin (ICML 2014).

Update, with ``g = grad L + theta / (N prior_std^2)`` (see :class:`SGMCMC`), momentum ``m``
(one minus the friction ``alpha``) and velocity ``v``::

    v     <- m * v - lr * g + sqrt(2 * (1 - m) * lr * T / N) * xi,    xi ~ N(0, I)
    theta <- theta + v

This is the SGD-with-momentum form of SGHMC with step size ``lr / N`` on the potential ``U``
and the gradient-noise estimate set to zero. Its stationary density in ``theta`` is
``exp(-U(theta) / T)``.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from dist_bnn.samplers.base import SGMCMC


class SGHMC(SGMCMC):
    """SGHMC sampler; see the module docstring for the update rule and target."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        num_data: int,
        momentum: float = 0.9,
        temperature: float = 1.0,
        prior_std: float = 1.0,
        noise_seed: int = 0,
    ) -> None:
        self._check_hyperparameters(lr, temperature, prior_std, num_data)
        if not 0 <= momentum < 1:
            raise ValueError(f"expected 0 <= momentum < 1, got {momentum}")
        defaults = {
            "lr": lr,
            "num_data": num_data,
            "momentum": momentum,
            "temperature": temperature,
            "prior_std": prior_std,
        }
        super().__init__(params, defaults, noise_seed)

    def _init_param_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"momentum_buffer": torch.zeros_like(param, memory_format=torch.preserve_format)}

    def _update_group(self, group: dict[str, Any]) -> None:
        noise_std = self._noise_std(1.0 - group["momentum"], group)
        for param in group["params"]:
            velocity = self.state[param]["momentum_buffer"]
            velocity.mul_(group["momentum"]).add_(self._potential_grad(param, group), alpha=-group["lr"])
            noise = self._noise_like(param, noise_std)
            if noise is not None:
                velocity.add_(noise)
            param.add_(velocity)
