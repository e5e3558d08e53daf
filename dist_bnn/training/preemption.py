"""Preemption: a signal only sets a flag; the ranks agree at an iteration boundary, save, exit.

Doing the save inside the signal handler could interrupt a collective or a half-written file.
Instead the ranks combine their flags at every iteration, so all ranks stop at the same
iteration, write one checkpoint there and exit with ``dist_bnn.errors.PREEMPTED_EXIT_CODE``
(75). A relaunch resumes inside the interrupted epoch at the next batch.

The flags travel in the gradient all-reduce that DDP does anyway. A DDP communication hook
appends this rank's flag to the last gradient bucket, so agreeing costs one more number in a
collective that runs anyway, not a collective of its own per iteration.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from dist_bnn import distributed
from dist_bnn.errors import PREEMPTED_EXIT_CODE, Preempted  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

class PreemptionFlag:
    """Records the first of ``signal_names`` that arrives. Build and install on every rank.

    Args:
        signal_names: names such as ``"SIGTERM"``.
        current_iteration: returns the iteration being run, for the log line.
    """

    def __init__(self, signal_names: list[str], current_iteration: Callable[[], int]) -> None:
        self.signal_names = list(signal_names)
        self.current_iteration: Callable[[], int] | None = current_iteration
        self.received: str | None = None
        self.received_at_iteration: int | None = None
        self._previous: dict[int, Any] = {}
        self._via_ddp = False
        # The sum of every rank's flag, set by the DDP hook during each backward pass.
        self._combined: torch.Tensor | None = None

    def install(self) -> None:
        for name in self.signal_names:
            number = signal.Signals[name]
            self._previous[number] = signal.signal(number, self._handle)

    def uninstall(self) -> None:
        """Restore the previous signal handlers and drop ``current_iteration``.

        A DDP model's reducer keeps this object alive as its communication hook's state, and
        ``current_iteration`` usually refers back to the job that owns that model. The cycle
        runs through C++, so the garbage collector cannot free it, and the model and its
        process group would outlive ``destroy_process_group``.
        """
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
        self.current_iteration = None

    def _handle(self, number: int, frame: FrameType | None) -> None:
        # Only plain assignments here: the handler runs between two bytecodes of the main thread.
        if self.received is None:
            self.received = signal.Signals(number).name
            self.received_at_iteration = self.current_iteration() if self.current_iteration else None

    def attach(self, model: torch.nn.Module) -> None:
        """Carry the flag in ``model``'s DDP gradient all-reduce from now on. Call on every
        rank before the first step; a model that is not wrapped in DDP is left alone."""
        if isinstance(model, DistributedDataParallel):
            self._via_ddp = True
            model.register_comm_hook(self, _allreduce_with_flag)

    def requested_anywhere(self, device: torch.device) -> bool:
        """Return whether any rank received a signal. Every rank must call this, once per
        iteration, after the backward pass."""
        if distributed.world_size() == 1:
            return self.received is not None
        if self._via_ddp:
            combined, self._combined = self._combined, None
            if combined is None:
                raise RuntimeError("no gradient all-reduce carried the preemption flag in this iteration")
            # NOTE: on CUDA this read waits for the gradient all-reduce, a host sync per
            # iteration; its cost has not been measured on a GPU yet.
            return bool(combined.item() > 0)
        local = torch.tensor(1 if self.received else 0, device=device)
        return bool(distributed.all_reduce_sum(local).item() > 0)


# No annotations on ``bucket`` and the return value: DDP compares them with the classes
# themselves, and this module's postponed annotations would be strings.
def _allreduce_with_flag(state: PreemptionFlag, bucket):  # type: ignore[no-untyped-def]
    """DDP communication hook: average the bucket's gradients like DDP's default hook, and for
    the last bucket of the iteration also sum every rank's preemption flag.

    Takes a ``dist.GradBucket``, returns a ``Future`` of the averaged bucket."""
    buffer = bucket.buffer()
    last = bucket.is_last()
    if last:
        flag = torch.ones(1) if state.received else torch.zeros(1)
        tensor = torch.cat([buffer, flag.to(dtype=buffer.dtype, device=buffer.device)])
    else:
        tensor = buffer
    tensor.div_(dist.get_world_size())
    future = dist.all_reduce(tensor, async_op=True).get_future()

    def unpack(future: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
        reduced = future.value()[0]
        if not last:
            return reduced
        state._combined = reduced[-1]
        return reduced[:-1]

    return future.then(unpack)
