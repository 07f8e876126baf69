"""When a mode's mass calls for a refinement, and when its rate drifts.

`MassTrigger` fires once when a mode's mass crosses the threshold with enough support, then stays
quiet until the mass has fallen below `threshold * hysteresis` (re-armed), and never fires for the
same workflow within `cooldown_s` of its last firing: one event per crossing, not a storm.

`node_groups` finds the failures the detector cut into several modes that each stay under the
threshold while together they are over it: the same mechanism split by what its failures talk
about (one entity's hallucinations apart from another's). The modes below the threshold that fail
at one node are one group; a group is observed by the same trigger under the key `node:<node>`, so
its crossing, too, fires once and re-arms below `threshold * hysteresis`.

`DriftWatch` runs River's ADWIN on each mode's per-execution failure indicator and reports a change
of its rate either way.
"""

from __future__ import annotations

from dataclasses import dataclass

from river import drift


@dataclass(slots=True)
class Crossing:
    workflow: str
    version: str
    mode: str
    mass: float
    support: int


class MassTrigger:
    def __init__(self, *, threshold: float, min_support: int, hysteresis: float, cooldown_s: float) -> None:
        self.threshold = threshold
        self.min_support = min_support
        self.rearm_below = threshold * hysteresis
        self.cooldown_s = cooldown_s
        self._disarmed: set[tuple[str, str, str]] = set()
        self._last_fired: dict[str, float] = {}

    def observe(
        self, workflow: str, version: str, mode: str, mass: float, support: int, now: float
    ) -> Crossing | None:
        key = (workflow, version, mode)
        if key in self._disarmed:
            if mass < self.rearm_below:
                self._disarmed.discard(key)
            return None
        if mass < self.threshold or support < self.min_support:
            return None
        last = self._last_fired.get(workflow)
        if last is not None and now - last < self.cooldown_s:
            return None
        self._disarmed.add(key)
        self._last_fired[workflow] = now
        return Crossing(workflow, version, mode, mass, support)

    def forget(self, mode: str) -> None:
        self._disarmed = {key for key in self._disarmed if key[2] != mode}


@dataclass(frozen=True, slots=True)
class Observed:
    mode: str
    node: str  # where most of the mode's failures are
    mass: float
    support: int


def node_groups(observed: list[Observed], threshold: float) -> list[list[Observed]]:
    """Per node, its modes under `threshold` (heaviest first) when they are two or more and their
    mass together reaches it; a mode at the threshold has a crossing of its own."""
    by_node: dict[str, list[Observed]] = {}
    for item in observed:
        if item.mass < threshold and item.node:
            by_node.setdefault(item.node, []).append(item)
    groups = []
    for node in sorted(by_node):
        modes = sorted(by_node[node], key=lambda item: (-item.mass, item.mode))
        if len(modes) > 1 and sum(item.mass for item in modes) >= threshold:
            groups.append(modes)
    return groups


@dataclass(slots=True)
class Drift:
    workflow: str
    version: str
    mode: str
    rate: float  # the mode's failure rate per execution in ADWIN's current window


class DriftWatch:
    def __init__(self, delta: float = 0.002) -> None:
        self.delta = delta
        self._detectors: dict[tuple[str, str, str], drift.ADWIN] = {}

    def observe(
        self, workflow: str, version: str, failures_by_mode: dict[str, int], modes: set[str]
    ) -> list[Drift]:
        """One execution of `workflow@version`: feed every known mode its indicator (failed in it or not)."""
        found = []
        for mode in sorted(modes):  # in a set's order, drifts would be logged by PYTHONHASHSEED
            key = (workflow, version, mode)
            detector = self._detectors.get(key)
            if detector is None:
                detector = self._detectors[key] = drift.ADWIN(delta=self.delta)
            detector.update(1.0 if failures_by_mode.get(mode) else 0.0)
            if detector.drift_detected:
                found.append(Drift(workflow, version, mode, detector.estimation))
        return found

    def forget(self, mode: str) -> None:
        self._detectors = {key: d for key, d in self._detectors.items() if key[2] != mode}
