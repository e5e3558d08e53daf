"""Stochastic gradient Langevin dynamics (SGLD), Welling and Teh (ICML 2011).

Update, with ``g = grad L + theta / (N prior_std^2)`` (see :class:`SGMCMC`)::

    theta <- theta - lr * g + sqrt(2 * lr * T / N) * xi,    xi ~ N(0, I)

This is the Euler-Maruyama discretisation of the Langevin diffusion whose stationary density is
``exp(-U(theta) / T)`` with step size ``lr / N`` on the potential ``U``.
"""

from __future__ import annotations

from typing import Any, Iterable

from dist_bnn.samplers.base import SGMCMC


class SGLD(SGMCMC):
    """SGLD sampler; see the module docstring for the update rule and target."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        num_data: int,
        temperature: float = 1.0,
        prior_std: float = 1.0,
        noise_seed: int = 0,
    ) -> None:
        self._check_hyperparameters(lr, temperature, prior_std, num_data)
        defaults = {"lr": lr, "num_data": num_data, "temperature": temperature, "prior_std": prior_std}
        super().__init__(params, defaults, noise_seed)

    def _update_group(self, group: dict[str, Any]) -> None:
        noise_std = self._noise_std(1.0, group)
        for param in group["params"]:
            param.add_(self._potential_grad(param, group), alpha=-group["lr"])
            noise = self._noise_like(param, noise_std)
            if noise is not None:
                param.add_(noise)
