"""Failure mass: how much of a workflow version's traffic fails in each mode, with decay.

mass(m, v) = decayed weight of failures of mode m in version v / decayed number of executions of v.
Time is counted in executions of that version, so a quiet version keeps its mass and a busy one
forgets old failures at the rate of `half_life` executions. The expected failure mass (EFM) of a
version is the sum over its modes. Decay is applied lazily (a value remembers the tick it was
written at), so an update is O(1) however many modes there are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

VersionKey = tuple[str, str]  # workflow id, version


@dataclass(slots=True)
class _Decayed:
    value: float = 0.0
    tick: int = 0


@dataclass(slots=True)
class VersionMass:
    executions: _Decayed = field(default_factory=_Decayed)
    modes: dict[str, _Decayed] = field(default_factory=dict)
    support: dict[str, int] = field(default_factory=dict)  # failures ever assigned, not decayed
    tick: int = 0  # executions seen


class MassTracker:
    def __init__(self, half_life: float) -> None:
        self.factor = 2 ** (-1.0 / half_life)
        self.versions: dict[VersionKey, VersionMass] = {}

    def _now(self, item: _Decayed, tick: int) -> float:
        return item.value * self.factor ** (tick - item.tick)

    def execution(self, key: VersionKey) -> None:
        state = self.versions.setdefault(key, VersionMass())
        state.tick += 1
        state.executions.value = self._now(state.executions, state.tick) + 1.0
        state.executions.tick = state.tick

    def failure(self, key: VersionKey, mode: str, weight: float = 1.0) -> None:
        state = self.versions.setdefault(key, VersionMass())
        item = state.modes.setdefault(mode, _Decayed(tick=state.tick))
        item.value = self._now(item, state.tick) + weight
        item.tick = state.tick
        state.support[mode] = state.support.get(mode, 0) + 1

    def mass(self, key: VersionKey, mode: str) -> float:
        state = self.versions.get(key)
        if state is None or mode not in state.modes:
            return 0.0
        executions = self._now(state.executions, state.tick)
        return self._now(state.modes[mode], state.tick) / executions if executions > 0 else 0.0

    def masses(self, key: VersionKey) -> dict[str, float]:
        state = self.versions.get(key)
        return {mode: self.mass(key, mode) for mode in state.modes} if state else {}

    def expected_failure_mass(self, key: VersionKey) -> float:
        return sum(self.masses(key).values())

    def support(self, key: VersionKey, mode: str) -> int:
        state = self.versions.get(key)
        return state.support.get(mode, 0) if state else 0

    def rename(self, old: str, new: str) -> None:
        """A merged mode's failures count towards the mode it merged into."""
        for state in self.versions.values():
            item = state.modes.pop(old, None)
            if item is None:
                continue
            target = state.modes.setdefault(new, _Decayed(tick=state.tick))
            target.value = self._now(target, state.tick) + self._now(item, state.tick)
            target.tick = state.tick
            state.support[new] = state.support.get(new, 0) + state.support.pop(old, 0)
