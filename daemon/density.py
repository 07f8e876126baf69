"""Streaming failure density over the FSS, with stable mode ids.

The density is River's DBSTREAM (chosen by measurement, see bench/bench_density.py and the README):
micro-clusters with time decay (`fading_factor` per failure), joined into macro-clusters through their
shared density. DBSTREAM relabels its macro-clusters on every reclustering, so the daemon never sees
its labels: `ModeTracker` gives each macro-cluster a stable mode id by the micro-clusters it is made
of. A macro-cluster keeps the id of the earlier mode it shares most micro-cluster weight with; when
two modes end up in one macro-cluster, the one sharing more weight (the older on a tie) keeps its id
and the other merges into it; a macro-cluster that shares
nothing with an earlier mode is a new mode; a mode whose micro-clusters have all faded fades.

Failures are learned one by one and assigned to modes in batches (`assign()`), after one reclustering
per batch: the reclustering is the expensive part, and a batch is what the detector commits at once.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from river import cluster

NOISE = ""  # failures in micro-clusters too light to belong to a mode yet


@dataclass(slots=True)
class ModeChange:
    kind: str  # "emerged", "merged", "faded"
    mode: str
    into: str | None = None


@dataclass(slots=True)
class TrackedMode:
    id: str
    created_at: int  # failure counter when it emerged
    micro: dict[int, float] = field(default_factory=dict)  # micro-cluster id -> weight at last recluster
    centroid: np.ndarray | None = None
    weight: float = 0.0  # decayed count of failures assigned


def _as_dict(vector: np.ndarray) -> dict[int, float]:
    return {i: float(v) for i, v in enumerate(vector) if v != 0.0}


class ModeTracker:
    """DBSTREAM underneath, stable mode ids on top."""

    def __init__(
        self,
        *,
        clustering_threshold: float = 1.05,
        half_life: float = 5_000,
        intersection_factor: float = 0.3,
        minimum_weight: float = 2.0,
        cleanup_interval: int = 200,
    ) -> None:
        self.model = cluster.DBSTREAM(
            clustering_threshold=clustering_threshold,
            fading_factor=1.0 / half_life,
            cleanup_interval=cleanup_interval,
            intersection_factor=intersection_factor,
            minimum_weight=minimum_weight,
        )
        self.radius = clustering_threshold
        self.decay = 2 ** (-1.0 / half_life)
        self.seen = 0
        self.modes: dict[str, TrackedMode] = {}
        self.next_id = 1
        self._micro_mode: dict[int, str] = {}
        self._pending: list[int] = []  # micro-cluster of each failure learned since the last assign()

    def learn_one(self, x: np.ndarray) -> None:
        point = _as_dict(x)
        self.model.learn_one(point)
        self.seen += 1
        self._pending.append(self._nearest_micro(point))

    def _nearest_micro(self, point: dict[int, float]) -> int:
        best, best_distance = -1, math.inf
        for micro_id, micro in self.model.micro_clusters.items():
            distance = self.model._distance(point, micro.center)
            if distance < best_distance:
                best, best_distance = micro_id, distance
        return best

    def classify(self, x: np.ndarray) -> str:
        """The mode a point falls in, learning nothing: the mode of the nearest micro-cluster when the
        point is within its radius (where DBSTREAM would absorb it), else NOISE."""
        point = _as_dict(x)
        micro = self._nearest_micro(point)
        if micro < 0 or self.model._distance(point, self.model.micro_clusters[micro].center) > self.radius:
            return NOISE
        return self._micro_mode.get(micro, NOISE)

    def assign(self) -> tuple[list[str], list[ModeChange]]:
        """Recluster, update mode identities, and return the mode of each failure since the last call."""
        changes = self._recluster()
        modes = [self._micro_mode.get(micro, NOISE) for micro in self._pending]
        batch_decay = self.decay ** len(self._pending)
        for mode in self.modes.values():
            mode.weight *= batch_decay
        for mode_id in modes:
            if mode_id:
                self.modes[mode_id].weight += 1.0
        self._pending = []
        return modes, changes

    def _labels(self) -> dict[int, int | None]:
        # DBSTREAM's reclustering (Hahsler and Bolanos, algorithm 3), without its relabelled centres:
        # which macro-cluster each micro-cluster belongs to. Private API, pinned by river < 0.28.
        return self.model._generate_labels(self.model._generate_weighted_adjacency_matrix())

    def _recluster(self) -> list[ModeChange]:
        micro_clusters = self.model.micro_clusters
        groups: dict[int, dict[int, float]] = {}
        for micro_id, label in self._labels().items():
            if label is not None:
                groups.setdefault(label, {})[micro_id] = micro_clusters[micro_id].weight
        # Each group inherits at most one earlier mode and each mode passes to at most one group:
        # the pairs sharing the most micro-cluster weight first, the older mode on a tie.
        pairs = []
        for label, members in groups.items():
            shared: Counter[str] = Counter()
            for micro_id, weight in members.items():
                if micro_id in self._micro_mode:
                    shared[self._micro_mode[micro_id]] += weight
            pairs.extend(
                (weight, -self.modes[mode].created_at, mode, label) for mode, weight in shared.items()
            )
        owner: dict[int, str] = {}
        taken: set[str] = set()
        for _, _, mode, label in sorted(pairs, reverse=True):
            if label not in owner and mode not in taken:
                owner[label] = mode
                taken.add(mode)
        changes: list[ModeChange] = []
        micro_mode: dict[int, str] = {}
        for label, members in sorted(groups.items(), key=lambda item: min(item[1])):
            mode_id = owner.get(label)
            if mode_id is None:
                mode_id = f"m{self.next_id}"
                self.next_id += 1
                self.modes[mode_id] = TrackedMode(mode_id, created_at=self.seen)
                changes.append(ModeChange("emerged", mode_id))
            mode = self.modes[mode_id]
            mode.micro = dict(members)
            mode.centroid = self._centroid(members)
            micro_mode.update(dict.fromkeys(members, mode_id))
        for mode_id in [m for m in self.modes if m not in taken and m not in micro_mode.values()]:
            absorbed: Counter[str] = Counter()
            for micro_id, weight in self.modes[mode_id].micro.items():
                if micro_id in micro_mode:
                    absorbed[micro_mode[micro_id]] += weight
            if absorbed:
                into = absorbed.most_common(1)[0][0]
                self.modes[into].weight += self.modes[mode_id].weight
                changes.append(ModeChange("merged", mode_id, into=into))
            else:
                changes.append(ModeChange("faded", mode_id))
            del self.modes[mode_id]
        self._micro_mode = micro_mode
        return changes

    def _centroid(self, members: dict[int, float]) -> np.ndarray | None:
        total = sum(members.values())
        if total <= 0:
            return None
        centroid: dict[int, float] = {}
        for micro_id, weight in members.items():
            for k, value in self.model.micro_clusters[micro_id].center.items():
                centroid[k] = centroid.get(k, 0.0) + weight * value
        dim = 1 + max(centroid, default=0)
        vector = np.zeros(dim)
        for k, value in centroid.items():
            vector[k] = value / total
        return vector

    def state(self) -> dict[str, Any]:
        """Counts for metrics and the bounded-state benchmark."""
        return {"micro_clusters": len(self.model.micro_clusters), "modes": len(self.modes), "seen": self.seen}
