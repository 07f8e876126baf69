"""The one owner of the stages' threads: each stage polled on a thread of its own, every step committed
with its checkpoint, a failed stage reopened from its last checkpoint, and ingest held back while the
detector is too far behind.

`StageRunner` drives one `Stage` through its lifecycle (`daemon/stage.py`); `Runner` starts and stops
all of them. The embedded daemon uses the same runners without threads: `drain()` steps a stage until
it is caught up, in the caller's thread, so a seeded run repeats itself.
"""

from __future__ import annotations

import logging
import threading
import time

from cegraph.daemon.metrics import StageMetrics
from cegraph.daemon.stage import Checkpoint, Stage, Step
from cegraph.daemon.store import EventStore

log = logging.getLogger("cegraph.runner")


class StageRunner:
    def __init__(
        self,
        store: EventStore,
        stage: Stage,
        *,
        metrics: StageMetrics | None = None,
        poll_s: float = 1.0,
        backoff_max_s: float = 30.0,
    ) -> None:
        self.store = store
        self.stage = stage
        self.metrics = metrics
        self.poll_s = poll_s
        self.backoff_max_s = backoff_max_s
        self.checkpoint: Checkpoint | None = None  # the last committed one (or passed over), once open
        self._unstored: Checkpoint | None = None  # a passed-over step's, for the next commit
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._committed = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.stage.name

    def open(self) -> None:
        """Open the stage from its committed checkpoint (the first one when it has none)."""
        self.checkpoint = self.store.cursor(self.name) or Checkpoint()
        self._unstored = None
        self.stage.open(self.checkpoint)
        self._observe()

    def step(self) -> Step | None:
        """Poll the stage once and commit what it did with its checkpoint; opens the stage first."""
        if self.checkpoint is None:
            self.open()
        step = self.stage.poll()
        if step is None:
            self._store_passed_over()
            return None
        if step.passed_over and not step.events:
            self._unstored = step.checkpoint
        else:
            self.store.append(step.events, cursors={self.name: step.checkpoint})
            self._unstored = None
        with self._committed:
            self.checkpoint = step.checkpoint
            self._committed.notify_all()
        if self.metrics is not None:
            self.metrics.events.labels(self.name).inc(len(step.events))
        self._observe()
        return step

    def drain(self) -> int:
        """Step until the stage has nothing to do; returns the events it appended."""
        written = 0
        while (step := self.step()) is not None:
            written += len(step.events)
        return written

    def position(self) -> int:
        """The log position the stage has read up to (1 before it opens): its committed checkpoint's, or
        a passed-over step's not stored yet."""
        return self.checkpoint.position if self.checkpoint is not None else 1

    @property
    def reads_log(self) -> bool:
        return getattr(self.stage, "reads_log", True)

    def lag(self) -> int:
        """Events in the log the stage has not read yet (0 for a stage that does not read the log)."""
        return max(0, self.store.last_seq() + 1 - self.position()) if self.reads_log else 0

    def wait_until_within(self, max_lag: int, stop: threading.Event) -> float:
        """Block while the stage is more than `max_lag` events behind, or until `stop`; seconds waited."""
        started = time.monotonic()
        with self._committed:
            while self.lag() > max_lag and not stop.is_set() and not self._stop.is_set():
                self._committed.wait(self.poll_s)
        return time.monotonic() - started

    def wake(self) -> None:
        """There is new work in the log: poll now rather than after `poll_s`."""
        self._wake.set()

    def _observe(self) -> None:
        if self.metrics is not None and self.checkpoint is not None and self.reads_log:
            self.metrics.position.labels(self.name).set(self.checkpoint.position)
            self.metrics.lag.labels(self.name).set(self.lag())

    # ------------------------------------------------------------------ on a thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"cegraph-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        with self._committed:
            self._committed.notify_all()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)
        if self.store.usable:
            try:  # else the next start reads the passed-over stretch again, and finds nothing again
                self._store_passed_over()
            except Exception as error:
                log.warning("stage %s: its last checkpoint was not stored (%s)", self.name, error)
        self.stage.close()

    def _store_passed_over(self) -> None:
        """Store a passed-over checkpoint once the stage is caught up: while it has work, the next
        step's commit supersedes it; when idle, a transaction costs no throughput, and the stored
        cursor (what /stats and a restart see) then matches what the stage has read."""
        if self._unstored is not None:
            self.store.append([], cursors={self.name: self._unstored})
            self._unstored = None

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                step = self.step()
                failures = 0
            except Exception as error:  # the stage, or the store under it, failed: reopen and go on
                failures += 1
                log.error("stage %s failed (%s: %s); reopening it from its checkpoint", self.name,
                          type(error).__name__, error, exc_info=failures == 1)  # fmt: skip
                if self.metrics is not None:
                    self.metrics.failures.labels(self.name).inc()
                self.reset()
                self._stop.wait(min(self.backoff_max_s, 0.5 * 2 ** min(failures - 1, 10)))
                continue
            if step is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()

    def reset(self) -> None:
        """Forget the stage's state: the next step opens it again from the committed checkpoint."""
        try:
            self.stage.close()
        except Exception:
            log.exception("closing stage %s", self.name)
        self.checkpoint = None
        if not self.store.usable:
            try:
                self.store.reopen()
            except Exception as error:
                log.warning("the store is still unusable: %s", error)


class Runner:
    """Every thread of a process after ingest, started and stopped together, in pipeline order."""

    def __init__(self, runners: list[StageRunner]) -> None:
        self.runners = {runner.name: runner for runner in runners}

    def __getitem__(self, name: str) -> StageRunner:
        return self.runners[name]

    def start(self) -> None:
        for runner in self.runners.values():
            runner.open()
            runner.start()

    def stop(self) -> None:
        for runner in self.runners.values():
            runner.stop()

    def drain(self, *names: str) -> int:
        """Step the named stages (all, by default) in order until each is caught up."""
        return sum(self.runners[name].drain() for name in names or self.runners)


class Backpressure:
    """Holds ingest back while a stage after it is more than `max_lag` events behind: a slow detector
    then shows as consumer lag and as `cegraph_stage_backpressure_seconds_total`, and never runs
    inside ingest's lock."""

    def __init__(self, runners: list[StageRunner], max_lag: int, metrics: StageMetrics | None = None) -> None:
        self.runners = runners
        self.max_lag = max_lag
        self.metrics = metrics
        self._stop = threading.Event()

    def wait(self) -> None:
        for runner in self.runners:
            waited = runner.wait_until_within(self.max_lag, self._stop)
            if waited > 0 and self.metrics is not None:
                self.metrics.backpressure.labels(runner.name).inc(waited)

    def release(self) -> None:
        """Stop holding anything back (shutdown)."""
        self._stop.set()
