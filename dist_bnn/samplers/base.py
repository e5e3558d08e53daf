"""Shared machinery of the SG-MCMC optimizers: the noise generator and its checkpointed state."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch.optim import Optimizer

# Key, in the optimizer state of the first parameter, that stores the noise generator's state.
# Keeping it in the per-parameter state means every tool that checkpoints optimizer state
# (DCP's get_state_dict, torch.save of state_dict()) carries it without special handling.
NOISE_STATE_KEY = "noise_generator_state"


class SGMCMC(Optimizer):
    """Base class of stochastic-gradient MCMC samplers in the mean-loss parametrisation.

    The target is the tempered posterior ``p(theta | D)^(1/T)`` with the potential
    ``U(theta) = N * L(theta) + |theta|^2 / (2 prior_std^2)``, where ``L`` is the mean negative
    log-likelihood over the mini-batch (the usual mean loss) and ``N`` is the size of the whole
    training set, not the per-rank shard. Subclasses step with the per-example gradient
    ``grad U / N = grad L + theta / (N prior_std^2)``, so ``lr`` has the scale of an SGD step
    size on the mean loss.

    The Langevin noise comes from one ``torch.Generator`` seeded with ``noise_seed``. Build the
    optimizer with the same seed on every rank and call ``step()`` after DDP's gradient
    all-reduce: every replica then draws the same noise and applies the same update. With
    independent per-rank noise the replicas would drift apart. Averaging their noise instead
    would shrink its variance by the world size and make the chain colder.

    Every parameter group has the key ``add_noise`` (default true). A schedule sets it to false,
    together with ``lr``, for the steps of a noise-free exploration phase (see
    :mod:`dist_bnn.samplers.schedules`); those steps leave the noise generator untouched.

    Construct on every rank. Per-parameter state is created eagerly, which also stops DCP's
    ``get_state_dict`` from initialising it with a zero-gradient ``step()`` that would advance
    the noise generator.
    """

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], noise_seed: int) -> None:
        super().__init__(params, {**defaults, "add_noise": True})
        first = self._first_param()
        self._noise_generator = torch.Generator(device=first.device)
        self._noise_generator.manual_seed(noise_seed)
        for group in self.param_groups:
            for param in group["params"]:
                self.state[param].update(self._init_param_state(param))
        self.state[first][NOISE_STATE_KEY] = self._noise_generator.get_state()

    def _init_param_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the initial per-parameter state; samplers with buffers override this."""
        return {}

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Apply one update of the sampler's rule to every parameter group."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._update_group(group)
        return loss

    def _update_group(self, group: dict[str, Any]) -> None:
        """Update the parameters of ``group`` in place; every sampler defines its rule here."""
        raise NotImplementedError

    def _first_param(self) -> torch.Tensor:
        return self.param_groups[0]["params"][0]

    @staticmethod
    def _check_hyperparameters(lr: float, temperature: float, prior_std: float, num_data: int) -> None:
        # Comparisons written as "not ..." so that NaN fails them too.
        if not 0 < lr < math.inf:
            raise ValueError(f"expected 0 < lr < inf, got {lr}")
        if not 0 <= temperature < math.inf:
            raise ValueError(f"expected 0 <= temperature < inf, got {temperature}")
        if not 0 < prior_std < math.inf:
            raise ValueError(f"expected 0 < prior_std < inf, got {prior_std}")
        if num_data < 1:
            raise ValueError(f"expected num_data >= 1 (the full training-set size), got {num_data}")

    @staticmethod
    def _potential_grad(param: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Return ``grad L + theta / (N prior_std^2)``; a parameter without gradient gets the
        prior term only."""
        prior_term = param / (group["num_data"] * group["prior_std"] ** 2)
        if param.grad is None:
            return prior_term
        return param.grad + prior_term

    def _noise_like(self, param: torch.Tensor, std: float) -> torch.Tensor | None:
        """Draw ``std * N(0, I)`` shaped like ``param`` from the shared generator.

        Returns ``None`` without touching the generator when ``std`` is 0 (temperature 0 or a
        noise-free step of a schedule), so a noise-free step leaves the stream where it was.
        """
        if std == 0:
            return None
        noise = torch.randn(
            param.shape, generator=self._noise_generator, device=param.device, dtype=param.dtype
        )
        return noise.mul_(std)

    @staticmethod
    def _noise_std(variance_scale: float, group: dict[str, Any]) -> float:
        """Return ``sqrt(2 * variance_scale * lr * T / N)``, the Langevin noise scale, or 0 in a
        step that a schedule runs without noise."""
        if not group["add_noise"]:
            return 0.0
        return math.sqrt(
            2.0 * variance_scale * group["lr"] * group["temperature"] / group["num_data"]
        )

    def state_dict(self) -> dict[str, Any]:
        self.state[self._first_param()][NOISE_STATE_KEY] = self._noise_generator.get_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        stored = self.state[self._first_param()].get(NOISE_STATE_KEY)
        if stored is None:
            raise KeyError(
                f"optimizer state has no {NOISE_STATE_KEY!r}: it was not saved by a dist_bnn "
                f"sampler, so the Langevin noise stream cannot continue"
            )
        # Optimizer.load_state_dict moves state to the parameter's device; Generator.set_state
        # takes a CPU byte tensor whatever the generator's device.
        self._noise_generator.set_state(stored.to(device="cpu", dtype=torch.uint8))
