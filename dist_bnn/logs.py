"""Rank-aware logging, configured once by the entry point."""

from __future__ import annotations

import logging
import sys

_FORMAT = "%(asctime)s [rank {rank}/{world}] %(levelname)s %(name)s: %(message)s"


def setup_logging(rank: int, world_size: int, level: str = "INFO") -> None:
    """Send the package's log records to stderr with the rank in every line.

    Rank 0 logs at ``level``; other ranks log warnings and errors only, so a multi-rank run
    prints each lifecycle message once.
    """
    effective = level.upper() if rank == 0 else "WARNING"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(_FORMAT.format(rank=rank, world=world_size), "%H:%M:%S")
    )
    root = logging.getLogger("dist_bnn")
    root.handlers[:] = [handler]
    root.setLevel(effective)
    root.propagate = False
    # Ignite logs every epoch at INFO through its own loggers; keep only its warnings.
    logging.getLogger("ignite").setLevel(logging.WARNING)
    # An engine logs every exception before re-raising it. The command line reports the error
    # once (or Python prints its traceback), so the engine's copy would only repeat it.
    logging.getLogger("ignite.engine.engine.Engine").setLevel(logging.CRITICAL)
