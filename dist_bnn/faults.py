"""Fault-injection hook: pause a checkpoint save at a named phase so a harness can kill it there.

Set ``DIST_BNN_PAUSE_AT=<phase>[:<n>]`` to pause the n-th time (default 1st) a rank reaches
``<phase>``. Rank 0 then creates the file named by ``DIST_BNN_PAUSE_MARKER``, and every rank
that reached the phase sleeps until it is killed. Without ``DIST_BNN_PAUSE_AT`` the hook costs
one dictionary lookup. Phases, in save order: ``rng`` (RNG files written), ``shards`` (DCP
shards and .metadata written), ``manifest`` (manifest written, directory not yet renamed),
``commit`` (renamed, other ranks not yet informed).
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
PHASES = ("rng", "shards", "manifest", "commit")

_reached: Counter[str] = Counter()


def pause_point(phase: str, rank: int) -> None:
    """Sleep forever here if ``DIST_BNN_PAUSE_AT`` names this phase and occurrence."""
    spec = os.environ.get(PAUSE_AT_ENV)
    if not spec:
        return
    name, _, occurrence = spec.partition(":")
    if name not in PHASES:
        raise ValueError(f"{PAUSE_AT_ENV}={spec!r} names no phase; allowed: {', '.join(PHASES)}")
    if name != phase:
        return
    _reached[phase] += 1
    if _reached[phase] != int(occurrence or 1):
        return
    logger.warning("pausing at checkpoint phase %r for fault injection (%s=%s)", phase, PAUSE_AT_ENV, spec)
    marker = os.environ.get(PAUSE_MARKER_ENV)
    if marker and rank == 0:
        Path(marker).touch()
    while True:
        time.sleep(60)
