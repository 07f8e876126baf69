"""The garbage collector's settings for a long-running daemon, applied once its start-up is done.

Ingest makes and drops many short-lived objects per batch, while the process holds a large, stable
heap (imported modules, the store, models). With CPython's defaults a full collection walks all of it
and young collections run every 700 allocations: measured on stage 1 of `make bench BENCH=ingest`,
collections took about a fifth of its CPU time. Freezing what start-up made takes it out of every later
collection (it is never garbage), and a larger first threshold makes young collections rarer.
Objects without cycles are freed by reference counting either way; garbage in cycles waits longer
(`make bench BENCH=memory` runs with them).
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000  # allocations between young collections (CPython's default: 700)


def settle() -> None:
    """Collect what start-up left behind, freeze the rest, and make young collections rarer."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
