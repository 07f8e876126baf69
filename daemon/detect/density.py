"""Streaming failure density over the FSS, with stable mode ids.

Two levels, chosen by the bake-off in bench/bench_modes.py (docs/modes.md):

- micro-clusters, online (`MicroClusters`): each failure joins the nearest centre within `micro_radius`
  (cosine distance) or starts one. Weights decay (`half_life` failures), so old modes fade. The count
  is bounded (`capacity`): past it the lightest micro-cluster is merged into its nearest neighbour, so
  the per-failure cost is one distance to at most `capacity` centres.
- modes, at every `assign()`: an incremental average-linkage agglomeration of the micro-cluster
  centres, cut at `mode_distance` (cosine). It starts from the previous partition, not from scratch:
  each earlier group is first tested for a split (the agglomeration of its own micro-clusters), then
  the pieces and the new micro-clusters are merged pairwise while their mean distance is under the
  cut. A micro-cluster changes group only when its group splits or merges, so a mode keeps its
  members and an id names the same failures over the stream (recomputed from scratch, near-equal
  linkages moved micro-clusters between groups at every batch). A group whose decayed weight reaches
  `minimum_weight` is a mode; lighter groups are noise. The cut is a distance, not a number of modes:
  the daemon does not know how many modes there are, and a new one must be free to appear.

`ModeTracker` gives each group a stable mode id by the micro-clusters it is made of. A group keeps
the id of the earlier mode it shares most micro-cluster weight with; when two modes end up in one
group, the one sharing more weight (the older on a tie) keeps its id and the other merges into it; a
group that shares nothing with an earlier mode is a new mode; a mode whose micro-clusters have all
faded fades. Mode ids come from an `ids` allocator that may be shared by several trackers (one per
workflow), so an id names one mode of one workflow.

Failures are learned one by one and assigned to modes in batches (`assign()`), after one reclustering
per batch: the reclustering is the expensive part, and a batch is what the detector commits at once.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform

NOISE = ""  # failures in micro-clusters too light to belong to a mode yet
HASHED_MODE_DISTANCE = 0.7  # the cut for hashed-term signatures (see `ModeTracker`)
EMBEDDED_MODE_DISTANCE = 0.5  # the cut for sentence-embedding signatures


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


class ModeIds:
    """Mode ids m1, m2, ... of one workflow, `m1@<workflow>` when it has an id: an id names one mode
    of one workflow, and does not depend on the order other workflows' modes emerged in (which
    differs between a detector that sees every workflow and one that sees some of them)."""

    def __init__(self, workflow: str = "") -> None:
        self.suffix = f"@{workflow}" if workflow else ""
        self.last = 0

    def next(self) -> str:
        self.last += 1
        return f"m{self.last}{self.suffix}"


def unit(x: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(x))
    return x / norm if norm > 0 else x


def average_linkage(distances: np.ndarray, groups: list[list[int]], cut: float) -> list[list[int]]:
    """Average-linkage agglomeration of the points of `distances` (a symmetric matrix), starting from
    `groups` (lists of row indices) rather than from single points: the two groups with the smallest
    mean pairwise distance merge while it is under `cut`. From single points it is the textbook
    (scikit-learn's) average linkage; from an earlier partition it can only join what was apart."""
    groups = [list(group) for group in groups]
    k = len(groups)
    if k < 2:
        return groups
    order = [row for group in groups for row in group]
    counts = np.array([len(group) for group in groups], dtype=np.float64)
    starts = np.concatenate([[0], np.cumsum(counts[:-1])]).astype(np.intp)
    sums = np.add.reduceat(np.add.reduceat(distances[np.ix_(order, order)], starts, axis=0), starts, axis=1)
    mean = sums / np.outer(counts, counts)
    np.fill_diagonal(mean, np.inf)
    alive = np.ones(k, dtype=bool)
    while True:
        i, j = sorted(divmod(int(np.argmin(mean)), k))
        if not mean[i, j] < cut:
            break
        sums[i] += sums[j]
        sums[:, i] += sums[:, j]
        counts[i] += counts[j]
        groups[i] += groups[j]
        alive[j] = False
        row = np.where(alive, sums[i] / (counts[i] * counts), np.inf)
        row[i] = np.inf
        mean[i], mean[:, i] = row, row
        mean[j], mean[:, j] = np.inf, np.inf
    return [group for group, live in zip(groups, alive, strict=True) if live]


class MicroClusters:
    """Fixed-radius micro-clusters of unit vectors with decayed weights, at most `capacity` of them."""

    def __init__(self, *, radius: float, decay: float, capacity: int, fade_below: float) -> None:
        self.radius, self.decay, self.capacity, self.fade_below = radius, decay, capacity, fade_below
        self.centres = np.zeros((0, 0))  # rows: sums of the unit vectors, decayed like the weights
        self.weights = np.zeros(0)
        self.ticks = np.zeros(0, dtype=np.int64)
        self.ids = np.zeros(0, dtype=np.int64)
        self.tick = 0
        self._next_id = 0
        self.moved: dict[int, int] = {}  # micro-cluster merged away -> the one it went into

    def __len__(self) -> int:
        return len(self.ids)

    def current_weights(self) -> np.ndarray:
        return self.weights * self.decay ** (self.tick - self.ticks)

    def directions(self) -> np.ndarray:
        norms = np.linalg.norm(self.centres, axis=1, keepdims=True)
        return self.centres / np.maximum(norms, 1e-12)

    def nearest(self, x: np.ndarray) -> tuple[int, float]:
        """Row of the nearest centre and its cosine distance; (-1, inf) when there is none."""
        if not len(self):
            return -1, float("inf")
        similarity = self.directions() @ x
        row = int(np.argmax(similarity))
        return row, 1.0 - float(similarity[row])

    def learn_one(self, x: np.ndarray) -> int:
        """Absorb a unit vector; the id of the micro-cluster it went into."""
        self.tick += 1
        if self.centres.shape[1] != len(x):
            self._resize(len(x))
        row, distance = self.nearest(x)
        if row >= 0 and distance <= self.radius:
            factor = self.decay ** (self.tick - self.ticks[row])
            self.centres[row] = self.centres[row] * factor + x
            self.weights[row] = self.weights[row] * factor + 1.0
            self.ticks[row] = self.tick
            return int(self.ids[row])
        new_id = self._next_id
        self._next_id += 1
        self.centres = np.vstack([self.centres, x[None]])
        self.weights = np.append(self.weights, 1.0)
        self.ticks = np.append(self.ticks, self.tick)
        self.ids = np.append(self.ids, new_id)
        if len(self) > self.capacity:
            self._merge_lightest(keep=new_id)
        return new_id

    def _resize(self, dim: int) -> None:
        """A signature of another width (another featurizer) cannot be compared: start over."""
        self.centres = np.zeros((0, dim))
        self.weights, self.ticks, self.ids = np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0, np.int64)

    def _merge_lightest(self, keep: int) -> None:
        weights = self.current_weights()
        candidates = weights.copy()
        candidates[self.ids == keep] = np.inf
        row = int(np.argmin(candidates))
        directions = self.directions()
        similarity = directions @ directions[row]
        similarity[row] = -np.inf
        into = int(np.argmax(similarity))
        factor = self.decay ** (self.tick - self.ticks)
        self.centres[into] = self.centres[into] * factor[into] + self.centres[row] * factor[row]
        self.weights[into] = weights[into] + weights[row]
        self.ticks[into] = self.tick
        self.moved[int(self.ids[row])] = int(self.ids[into])
        self._drop(np.array([row]))

    def fade(self) -> None:
        """Forget micro-clusters whose decayed weight fell below `fade_below`."""
        gone = np.flatnonzero(self.current_weights() < self.fade_below)
        if len(gone):
            self._drop(gone)

    def _drop(self, rows: np.ndarray) -> None:
        keep = np.ones(len(self), dtype=bool)
        keep[rows] = False
        self.centres, self.weights = self.centres[keep], self.weights[keep]
        self.ticks, self.ids = self.ticks[keep], self.ids[keep]

    def resolve(self, micro_id: int) -> int:
        while micro_id in self.moved:
            micro_id = self.moved[micro_id]
        return micro_id


class ModeTracker:
    """Online micro-clusters underneath, modes from their agglomeration, stable mode ids on top.

    Distances are cosine distances between signatures (each is scaled to unit length), so the two
    thresholds do not depend on how long the vectors are. They are absolute, not relative to the
    spread of the data: a workflow with one failure mode must keep it whole, and only an absolute
    cut can tell one diffuse mode from many. `mode_distance` depends on the text features, through
    how alike two unrelated failures are: with hashed terms (`HASHED_MODE_DISTANCE`, 0.7) unrelated
    texts are orthogonal and failures of one node share the structure block (about a quarter of the
    squared length), so groups join when their average similarity is above 0.3; with sentence
    embeddings (`EMBEDDED_MODE_DISTANCE`, 0.5) unrelated texts already have a similarity of about
    0.2, and the cut moves by that much. `micro_radius` 0.1 keeps a micro-cluster to near-repeats of
    one failure, well inside any mode. The bake-off and the measurements behind the values are in
    docs/modes.md.
    """

    def __init__(
        self,
        *,
        mode_distance: float = HASHED_MODE_DISTANCE,
        micro_radius: float = 0.1,
        half_life: float = 5_000,
        minimum_weight: float = 2.0,
        capacity: int = 400,
        ids: ModeIds | None = None,
    ) -> None:
        self.decay = 2 ** (-1.0 / half_life)
        self.micro = MicroClusters(
            radius=micro_radius, decay=self.decay, capacity=capacity, fade_below=minimum_weight / 8
        )
        self.mode_distance = mode_distance
        self.minimum_weight = minimum_weight
        self.seen = 0
        self.modes: dict[str, TrackedMode] = {}
        self._ids = ids if ids is not None else ModeIds()
        self._micro_mode: dict[int, str] = {}
        self._partition: list[list[int]] = []  # micro-cluster ids of every group, light ones too
        self._whole: set[frozenset[int]] = set()  # groups of it that are pieces of a split test
        self._tested_at = 0  # the micro-clusters' tick at the last split tests
        self._pending: list[int] = []  # micro-cluster of each failure learned since the last assign()

    def learn_one(self, x: np.ndarray) -> None:
        self.seen += 1
        self._pending.append(self.micro.learn_one(unit(np.asarray(x, dtype=np.float64))))

    def classify(self, x: np.ndarray, exclude: int | None = None) -> str:
        """The mode a point falls in, learning nothing: the mode of the nearest micro-cluster that is in
        a mode, when the point is within `mode_distance` of it (where the agglomeration could have
        joined it), else NOISE."""
        if not self._micro_mode:
            return NOISE
        in_mode = np.array([m in self._micro_mode and m != exclude for m in self.micro.ids.tolist()])
        if not in_mode.any():
            return NOISE
        similarity = self.micro.directions()[in_mode] @ unit(np.asarray(x, dtype=np.float64))
        best = int(np.argmax(similarity))
        if 1.0 - float(similarity[best]) > self.mode_distance:
            return NOISE
        return self._micro_mode[int(self.micro.ids[in_mode][best])]

    def assign(self) -> tuple[list[str], list[ModeChange]]:
        """Recluster, update mode identities, and return the mode of each failure since the last call."""
        changes = self._recluster()
        modes = [self._mode_of_micro(self.micro.resolve(micro)) for micro in self._pending]
        self.micro.moved.clear()
        batch_decay = self.decay ** len(self._pending)
        for mode in self.modes.values():
            mode.weight *= batch_decay
        for mode_id in modes:
            if mode_id:
                self.modes[mode_id].weight += 1.0
        self._pending = []
        return modes, changes

    def _mode_of_micro(self, micro_id: int) -> str:
        """A micro-cluster's mode; one in no mode (too light on its own) falls in the mode of its
        nearest micro-cluster within `mode_distance`, as `classify` would place a failure there."""
        mode = self._micro_mode.get(micro_id)
        if mode is not None:
            return mode
        rows = np.flatnonzero(self.micro.ids == micro_id)
        return self.classify(self.micro.directions()[rows[0]], exclude=micro_id) if len(rows) else NOISE

    def _groups(self) -> dict[int, dict[int, float]]:
        """Groups of micro-clusters heavy enough to be a mode: label -> {micro-cluster id: weight}.
        Every group of the previous partition is tested for a split, then the pieces and the
        micro-clusters that are new since then are merged (`average_linkage`); the partition, light
        groups included, is kept for the next call. A group found whole whose micro-clusters have
        not moved since is whole again, so it is not tested: the cost follows what changed."""
        self.micro.fade()
        ids = self.micro.ids.tolist()
        row_of = {micro_id: row for row, micro_id in enumerate(ids)}
        directions = self.micro.directions()
        distances = np.clip(1.0 - directions @ directions.T, 0.0, 2.0)
        np.fill_diagonal(distances, 0.0)
        pieces: list[list[int]] = []
        for group in self._partition:
            rows = [row_of[micro_id] for micro_id in group if micro_id in row_of]
            unmoved = len(rows) == len(group) and self.micro.ticks[rows].max(initial=0) <= self._tested_at
            pieces.extend(
                [rows] if unmoved and frozenset(group) in self._whole else self._split(distances, rows)
            )
        placed = {row for piece in pieces for row in piece}
        pieces.extend([row] for row in range(len(ids)) if row not in placed)
        partition = average_linkage(distances, pieces, self.mode_distance)
        self._partition = [[ids[row] for row in group] for group in partition]
        whole = {frozenset(piece) for piece in pieces}
        self._whole = {
            frozenset(group) for group in self._partition if frozenset(map(row_of.get, group)) in whole
        }
        self._tested_at = self.micro.tick
        weights = self.micro.current_weights()
        return {
            label: {ids[row]: float(weights[row]) for row in group}
            for label, group in enumerate(partition)
            if weights[group].sum() >= self.minimum_weight
        }

    def _split(self, distances: np.ndarray, rows: list[int]) -> list[list[int]]:
        """An earlier group's micro-clusters as the average linkage of them alone parts them at the
        cut: one piece while they still belong together."""
        if len(rows) < 2:
            return [rows] if rows else []
        pieces: list[list[int] | None] = [[row] for row in rows]
        tree = linkage(squareform(distances[np.ix_(rows, rows)], checks=False), method="average")
        for a, b, height, _ in tree.tolist():  # merges in increasing height (average linkage)
            if not height < self.mode_distance:
                break
            pieces.append(pieces[int(a)] + pieces[int(b)])
            pieces[int(a)] = pieces[int(b)] = None
        return [piece for piece in pieces if piece is not None]

    def _recluster(self) -> list[ModeChange]:
        groups = self._groups()
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
                mode_id = self._ids.next()
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
        rows = np.isin(self.micro.ids, list(members))
        if not rows.any():
            return None
        factor = self.micro.decay ** (self.micro.tick - self.micro.ticks[rows])
        return unit((self.micro.centres[rows] * factor[:, None]).sum(0))

    def frozen(self) -> dict[str, Any]:
        """What `classify` reads, and no more: the micro-clusters in a mode, their modes, the cut."""
        rows = np.array([m in self._micro_mode for m in self.micro.ids.tolist()], dtype=bool)
        ids = self.micro.ids[rows] if len(self.micro) else np.zeros(0, np.int64)
        return {
            "mode_distance": self.mode_distance,
            "ids": ids.copy(),
            "centres": self.micro.centres[rows].copy() if len(self.micro) else np.zeros((0, 0)),
            "modes": [self._micro_mode[int(i)] for i in ids.tolist()],
        }

    @classmethod
    def thawed(cls, frozen: dict[str, Any]) -> ModeTracker:
        """A tracker that classifies as the one `frozen()` was taken from did (it is not for learning)."""
        tracker = cls(mode_distance=frozen["mode_distance"])
        tracker.micro.centres = np.asarray(frozen["centres"], dtype=np.float64)
        tracker.micro.ids = np.asarray(frozen["ids"], dtype=np.int64)
        tracker._micro_mode = dict(zip(tracker.micro.ids.tolist(), frozen["modes"], strict=True))
        return tracker

    def state(self) -> dict[str, Any]:
        """Counts for metrics and the bounded-state benchmark."""
        return {"micro_clusters": len(self.micro), "modes": len(self.modes), "seen": self.seen}
