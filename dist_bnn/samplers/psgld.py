"""Preconditioned SGLD (pSGLD), Li, Chen, Carlson and Carin (AAAI 2016, arXiv:1512.07666).

Update, with ``g = grad L + theta / (N prior_std^2)`` (see :class:`SGMCMC`), decay ``a``
(``sampler.psgld_decay``) and ``eps`` (``sampler.psgld_epsilon``), element-wise::

    V     <- a * V + (1 - a) * g^2                      (V starts at 0)
    G     <- 1 / (eps + sqrt(V))
    theta <- theta - lr * G * g + sqrt(2 * lr * T * G / N) * xi,    xi ~ N(0, I)

This is SGLD with step size ``lr / N`` on the potential ``U`` preconditioned by the diagonal
matrix ``G``, an RMSprop estimate of the inverse gradient scale. Its target density is
``exp(-U(theta) / T)``. The exact sampler adds the drift ``T * Gamma`` with
``Gamma_i = d G_i / d theta_i`` to correct for a preconditioner that changes with ``theta``.
Like the paper's practical version, this one drops that term, which is small while ``V`` changes
slowly (``a`` close to 1), so the stationary density is only approximately the target.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from dist_bnn.samplers.base import SGMCMC


class PSGLD(SGMCMC):
    """pSGLD sampler; see the module docstring for the update rule and target."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        num_data: int,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        temperature: float = 1.0,
        prior_std: float = 1.0,
        noise_seed: int = 0,
    ) -> None:
        self._check_hyperparameters(lr, temperature, prior_std, num_data)
        if not 0 <= decay < 1:
            raise ValueError(f"expected 0 <= decay < 1, got {decay}")
        if not 0 < epsilon < float("inf"):
            raise ValueError(f"expected 0 < epsilon < inf, got {epsilon}")
        defaults = {
            "lr": lr,
            "num_data": num_data,
            "decay": decay,
            "epsilon": epsilon,
            "temperature": temperature,
            "prior_std": prior_std,
        }
        super().__init__(params, defaults, noise_seed)

    def _init_param_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"square_avg": torch.zeros_like(param, memory_format=torch.preserve_format)}

    def _update_group(self, group: dict[str, Any]) -> None:
        noise_std = self._noise_std(1.0, group)
        for param in group["params"]:
            grad = self._potential_grad(param, group)
            square_avg = self.state[param]["square_avg"]
            square_avg.mul_(group["decay"]).addcmul_(grad, grad, value=1 - group["decay"])
            preconditioner = square_avg.sqrt().add_(group["epsilon"]).reciprocal_()
            param.addcmul_(preconditioner, grad, value=-group["lr"])
            noise = self._noise_like(param, noise_std)
            if noise is not None:
                param.addcmul_(noise, preconditioner.sqrt_())
