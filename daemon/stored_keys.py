"""Which keys may be stored already, in constant time per key whatever the store holds.

Ingest asks this of every trace it completes (a trace read again after a crash or a rebalance must
amend the stored execution, not become a second one) and of every feedback and dead letter (one
delivered again adds nothing); the detector, of every execution it reads (whether it may have
feedback stored before it, `daemon/detect/inputs.py`). Asking the store each time costs a scan
that grows with it (246 ms per flush at 1,000,000 executions, measured for issue 19). A Bloom
filter over every stored key answers "certainly not" for new ones at a fixed cost; only its hits,
the keys really stored and about one in 10,000 of the others, are looked up exactly in the store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from rbloom import Bloom

# A flush of a few thousand new traces then has less than one false positive on average, and each
# costs an exact look-up (a scan of the executions' ids): 4.8 MB of filter per million ids.
FALSE_POSITIVES = 1e-4
MIN_CAPACITY = 100_000


class StoredKeys:
    """`load` gives every stored key, in batches (read again when the filter is full and grows);
    `count` is how many there are, to size the filter before reading them."""

    def __init__(self, load: Callable[[], Iterable[list[str]]], count: Callable[[], int]) -> None:
        self.load = load
        self.stored = count
        self._fill()

    def _fill(self) -> None:
        self.count = self.stored()
        self.capacity = max(MIN_CAPACITY, 2 * self.count)
        self._filter = Bloom(self.capacity, FALSE_POSITIVES)
        for batch in self.load():
            self._filter.update(batch)

    def add(self, keys: Iterable[str]) -> None:
        added = list(keys)
        self.count += len(added)
        if self.count > self.capacity:  # past capacity the false positives grow: start again bigger
            self._fill()
        else:
            self._filter.update(added)

    def maybe(self, keys: Iterable[str]) -> list[str]:
        """Those that may be stored (every stored one is among them)."""
        return [key for key in keys if key in self._filter]
