"""Fault-injection hook: pause a checkpoint save at a named phase so a harness can kill it there.

Set ``DIST_BNN_PAUSE_AT=<phase>[:<n>]`` to pause the n-th time (default 1st) a rank reaches
``<phase>``. Rank 0 then creates the file named by ``DIST_BNN_PAUSE_MARKER``, and every rank
that reached the phase sleeps until it is killed. Phases, in save order: ``rng`` (RNG files
written), ``writing`` (inside DCP's write of the shards; in the background thread with
``checkpoint.async_save``, while training goes on), ``shards`` (DCP shards and .metadata
written), ``manifest`` (manifest written, directory not yet renamed), ``commit`` (renamed, other
ranks not yet informed).

Two more variables turn the pause into a delay, to make one rank slow rather than dead:
``DIST_BNN_PAUSE_SECONDS`` sleeps that many seconds and then continues, and
``DIST_BNN_PAUSE_RANKS`` (comma-separated ranks) limits the pause to those ranks.

Without ``DIST_BNN_PAUSE_AT`` the hook costs one dictionary lookup.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path

logger = logging.getLogger(__name__)

PAUSE_AT_ENV = "DIST_BNN_PAUSE_AT"
PAUSE_MARKER_ENV = "DIST_BNN_PAUSE_MARKER"
PAUSE_SECONDS_ENV = "DIST_BNN_PAUSE_SECONDS"
PAUSE_RANKS_ENV = "DIST_BNN_PAUSE_RANKS"
PHASES = ("rng", "writing", "shards", "manifest", "commit")

_reached: Counter[str] = Counter()


def pause_point(phase: str, rank: int) -> None:
    """Pause here if ``DIST_BNN_PAUSE_AT`` names this phase and occurrence (see the module doc)."""
    spec = os.environ.get(PAUSE_AT_ENV)
    if not spec:
        return
    name, _, occurrence = spec.partition(":")
    if name not in PHASES:
        raise ValueError(f"{PAUSE_AT_ENV}={spec!r} names no phase; allowed: {', '.join(PHASES)}")
    if name != phase:
        return
    ranks = os.environ.get(PAUSE_RANKS_ENV)
    if ranks and str(rank) not in ranks.split(","):
        return
    _reached[phase] += 1
    if _reached[phase] != int(occurrence or 1):
        return
    seconds = os.environ.get(PAUSE_SECONDS_ENV)
    logger.warning(
        "pausing at checkpoint phase %r for %s for fault injection (%s=%s)",
        phase,
        f"{seconds} s" if seconds else "ever",
        PAUSE_AT_ENV,
        spec,
    )
    marker = os.environ.get(PAUSE_MARKER_ENV)
    if marker and rank == 0:
        Path(marker).touch()
    if seconds:
        time.sleep(float(seconds))
        return
    while True:
        time.sleep(60)
