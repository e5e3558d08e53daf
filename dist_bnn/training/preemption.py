"""Preemption: a signal only sets a flag; the ranks agree at an iteration boundary, save, exit.

Doing the save inside the signal handler could interrupt a collective or a half-written file.
Instead every rank checks the flag at the next iteration boundary with one all-reduce, so all
ranks stop at the same iteration, write one checkpoint there and exit with
``dist_bnn.errors.PREEMPTED_EXIT_CODE`` (75). A relaunch resumes inside the interrupted epoch at the next batch.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any, Callable

import torch

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
        self.current_iteration = current_iteration
        self.received: str | None = None
        self.received_at_iteration: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for name in self.signal_names:
            number = signal.Signals[name]
            self._previous[number] = signal.signal(number, self._handle)

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        # Only plain assignments here: the handler runs between two bytecodes of the main thread.
        if self.received is None:
            self.received = signal.Signals(number).name
            self.received_at_iteration = self.current_iteration()

    def requested_anywhere(self, device: torch.device) -> bool:
        """Return whether any rank received a signal. Every rank must call this."""
        local = torch.tensor(1 if self.received else 0, device=device)
        return bool(distributed.all_reduce_sum(local).item() > 0)
