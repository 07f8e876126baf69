"""The Failure Signature Space: each failure becomes a point, where it failed and what it says.

A signature is a dense vector of `DIM` floats in three blocks, weighted (`BLOCK_WEIGHTS`):

- structure (32 dims, signed feature hashing; feature weight in brackets, each scaled by how
  specific the feature is in the stream, `SignatureFeaturizer.structure`; the block is at most unit
  length): `node` workflow/node id (1.0), `kind` node kind (0.5), `op` operation (0.3), `path` the
  last three node ids from the root without instance numbers (0.5), `role` the enclosing agent and
  the node (0.5), `call` first / middle / last / only call of the node in the execution (0.3),
  `depth` (0.2), `sibling` position among siblings (0.1), `retries` earlier siblings of the same
  node (0.3), `source` error / truncated / evaluation / feedback (0.5), `tool` tool name (0.5).
- semantics (96 dims, L2-normalised, signed feature hashing of log TF x online IDF, where a term
  every failure has weighs almost nothing): terms of the error type and exception class (x2, plus an
  `err=` feature), the normalised error message (x1.5), the critique (x1.5), the span's output (x1)
  and the part of its input that is new to it, not the shared prompt (x0.5).
- traits (8 dims): log input and output tokens, latency relative to the node's running norm
  (z-score, clipped to +-3; 0 with `latency=False`, where durations are the machine's pace rather
  than the service's), finish reason length / content filter / stop / other, has-exception.

Hashing uses blake2b, never Python's `hash()`, so signatures don't depend on `PYTHONHASHSEED`; the
featurizer learns online (document frequencies, per-node latency norms) and is deterministic for the
same stream. `SignatureFeaturizer` follows River's transformer API (`learn_one`, `transform_one`).
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import orjson

from cegraph.daemon.detect.failures import Failure

STRUCTURE_DIM, TEXT_DIM, TRAITS_DIM = 32, 96, 8
DIM = STRUCTURE_DIM + TEXT_DIM + TRAITS_DIM
BLOCK_WEIGHTS = {"structure": 0.55, "text": 1.0, "traits": 0.25}
DF_BUCKETS = 1 << 18
MAX_NODE_NORMS = 10_000
OUTPUT_CHARS = 1_500
NEW_INPUT_CHARS = 1_000

_TOKEN = re.compile(r"[a-z][a-z0-9_]{1,30}")
_HEX = re.compile(r"\b(?:0x)?[0-9a-f]{8,}\b")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_QUOTED = re.compile(r"'[^']{1,200}'|\"[^\"]{1,200}\"")


@functools.lru_cache(maxsize=1 << 16)  # terms and feature names repeat across failures
def stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def normalize_message(text: str) -> str:
    """Lowercase, and mask what varies between occurrences of the same error: ids, numbers, quotes."""
    text = text.lower()
    text = _HEX.sub(" hexid ", text)
    text = _QUOTED.sub(" quoted ", text)
    return _NUMBER.sub(" num ", text)


def instance_free(node_id: str) -> str:
    """A node id without the numbers that name one instance of it ("Step 7" -> "Step #"): the same step
    of another iteration is the same place in the workflow."""
    return _NUMBER.sub("#", node_id)


def terms(text: str) -> list[str]:
    return _TOKEN.findall(normalize_message(text))


def _texts(item: object) -> list[str]:
    """Every string under the message-content keys of chat-message JSON."""
    if isinstance(item, str):
        return [item]
    if isinstance(item, list):
        return [text for element in item for text in _texts(element)]
    if isinstance(item, dict):
        keys = ("content", "text", "message", "messages", "parts")
        return [text for key in keys if key in item for text in _texts(item[key])]
    return []


def _messages(value: str) -> list[str]:
    """The text of each message of chat-message JSON (OpenInference / GenAI), or the text itself."""
    if not value.lstrip().startswith(("{", "[")):
        return [value]
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        return [value]
    if isinstance(data, dict) and isinstance(data.get("messages"), list):
        data = data["messages"]
    messages = ["\n".join(_texts(m)) for m in data] if isinstance(data, list) else ["\n".join(_texts(data))]
    messages = [m for m in messages if m]
    return messages or [value]


def _message_text(value: str) -> str:
    return "\n".join(_messages(value))


def new_input(value: str) -> str:
    """What is new to this span's input: the last message, not the shared system prompt before it
    (from a word boundary: a word cut in two is a rare, meaningless term)."""
    last = _messages(value)[-1]
    if len(last) <= NEW_INPUT_CHARS:
        return last
    tail = last[-NEW_INPUT_CHARS:]
    space = tail.find(" ", 0, 40)
    return tail[space + 1 :] if space >= 0 else tail


@dataclass(frozen=True, slots=True)
class SignatureParts:
    """The named features of one failure, before hashing (kept for mode descriptions and tests)."""

    structure: dict[str, float]
    text_terms: dict[str, float]  # term -> weight of its field
    traits: np.ndarray
    text: str = ""  # the same fields as one text, most failure-specific first, for an embedder


def describe(failure: Failure) -> SignatureParts:
    node = failure.node
    structure = {
        f"node={node.workflow_id}/{node.node_id}": 1.0,
        f"kind={node.kind}": 0.5,
        f"op={node.operation}": 0.3,
        f"path={'/'.join(instance_free(step) for step in failure.path[-3:])}": 0.5,
        f"role={instance_free(failure.agent)}/{node.node_id}": 0.5,
        f"call={failure.call}": 0.3,
        f"depth={min(failure.depth, 8)}": 0.2,
        f"sibling={min(failure.sibling_index, 5)}": 0.1,
        f"retries={min(failure.retries_before, 3)}": 0.3,
        f"source={failure.source}": 0.5,
    }
    if node.tool_name:
        structure[f"tool={node.tool_name}"] = 0.5
    fields = [
        (f"{node.error_type} {node.exception_type}", 2.0),
        (failure.message, 1.5),
        (failure.critique, 1.5),
        (_message_text(node.output_text)[:OUTPUT_CHARS], 1.0),
        (new_input(node.input_text), 0.5),  # what the call was given weighs less than what it said
    ]
    failure_text = ". ".join(
        text.strip() for text, _ in (fields[1], fields[2], fields[0], fields[3], fields[4]) if text.strip()
    )
    text_terms: dict[str, float] = {}
    for text, weight in fields:
        for term in terms(text):
            text_terms[term] = text_terms.get(term, 0.0) + weight
    for name in (node.error_type, node.exception_type):
        if name:
            text_terms[f"err={name.lower()}"] = text_terms.get(f"err={name.lower()}", 0.0) + 3.0
    finish = set(node.finish_reasons)
    traits = np.array(
        [
            math.log1p(node.input_tokens or 0) / 10,
            math.log1p(node.output_tokens or 0) / 10,
            0.0,  # latency z-score, filled in by the featurizer
            1.0 if "length" in finish or "max_tokens" in finish else 0.0,
            1.0 if "content_filter" in finish else 0.0,
            1.0 if "stop" in finish else 0.0,
            1.0 if finish - {"length", "max_tokens", "content_filter", "stop"} else 0.0,
            1.0 if node.exception_type else 0.0,
        ],
        dtype=np.float64,
    )
    return SignatureParts(structure, text_terms, traits, failure_text)


def _signed(features: dict[str, float], dim: int) -> np.ndarray:
    vector = np.zeros(dim)
    for name, value in features.items():
        h = stable_hash(name)
        vector[h % dim] += value if (h >> 32) & 1 else -value
    return vector


def _hashed(features: dict[str, float], dim: int) -> np.ndarray:
    vector = _signed(features, dim)
    norm = np.linalg.norm(vector)
    return vector / norm if norm > 0 else vector


class _RunningNorm:
    """Welford mean and variance of one node's latency."""

    __slots__ = ("count", "m2", "mean")

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, value: float) -> None:
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (value - self.mean)

    def zscore(self, value: float) -> float:
        if self.count < 5:
            return 0.0
        std = math.sqrt(self.m2 / (self.count - 1))
        return 0.0 if std == 0 else max(-3.0, min(3.0, (value - self.mean) / std)) / 3.0


class TextEmbedder(Protocol):
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray: ...


class SignatureFeaturizer:
    """Failure -> point in the FSS. Learns document frequencies and latency norms online.

    With an `embedder` (the `embeddings` extra, `daemon/detect/embedding.py`) the semantics block is the
    sentence embedding of the failure's text (384 dims) instead of hashed TF-IDF terms. Without
    `latency` the latency trait is 0: signatures then depend on nothing the clock says.
    """

    def __init__(self, embedder: TextEmbedder | None = None, *, latency: bool = True) -> None:
        self.embedder = embedder
        self.use_latency = latency
        self.dim = STRUCTURE_DIM + (embedder.dim if embedder else TEXT_DIM) + TRAITS_DIM
        self.documents = 0
        self.document_frequency = np.zeros(DF_BUCKETS, dtype=np.int64)
        self.latency: OrderedDict[str, _RunningNorm] = OrderedDict()

    def frozen(self) -> dict[str, Any]:
        """What `transform_one` reads: document frequencies (the buckets in use) and latency norms."""
        buckets = np.flatnonzero(self.document_frequency)
        return {
            "documents": self.documents,
            "buckets": buckets,
            "counts": self.document_frequency[buckets],
            "latency": [[key, n.count, n.mean, n.m2] for key, n in self.latency.items()],
            "use_latency": self.use_latency,
            "embedded": self.embedder is not None,
        }

    @classmethod
    def thawed(cls, frozen: dict[str, Any], embedder: TextEmbedder | None = None) -> SignatureFeaturizer:
        if frozen["embedded"] != (embedder is not None):
            made = "with" if frozen["embedded"] else "without"
            raise ValueError(
                f"these modes were made {made} sentence embeddings: CEGRAPH_DETECTOR__TEXT_FEATURES must "
                "be the same here as in the process that made them"
            )
        featurizer = cls(embedder, latency=frozen["use_latency"])
        featurizer.documents = frozen["documents"]
        featurizer.document_frequency[np.asarray(frozen["buckets"], dtype=np.int64)] = frozen["counts"]
        for key, count, mean, m2 in frozen["latency"]:
            norm = featurizer.latency[key] = _RunningNorm()
            norm.count, norm.mean, norm.m2 = count, mean, m2
        return featurizer

    def learn_one(self, failure: Failure, parts: SignatureParts | None = None) -> None:
        parts = parts or describe(failure)
        self.documents += 1
        buckets = {stable_hash(term) % DF_BUCKETS for term in (*parts.text_terms, *parts.structure)}
        self.document_frequency[list(buckets)] += 1
        node = failure.node
        key = f"{node.workflow_id}/{node.node_id}"
        norm = self.latency.get(key)
        if norm is None:
            norm = self.latency[key] = _RunningNorm()
            if len(self.latency) > MAX_NODE_NORMS:
                self.latency.popitem(last=False)
        else:
            self.latency.move_to_end(key)
        norm.update(max(node.end_ns - node.start_ns, 0) / 1e6)

    def idf(self, term: str) -> float:
        df = int(self.document_frequency[stable_hash(term) % DF_BUCKETS])
        # Smoothed so that a term every failure has weighs almost nothing (what all failures share
        # tells none apart), while the first failures of a stream still have a text of their own.
        return math.log((self.documents + 1) / (df + 0.5))

    def structure(self, features: dict[str, float]) -> np.ndarray:
        """The structure block, each feature scaled by how specific it is in this stream: a place that
        half the failures or fewer share counts fully, one that every failure shares (the only LLM
        node of a single-node agent) counts for nothing, so it cannot tie unrelated failures together.
        The block keeps the length it would have unscaled, at most 1."""
        full = np.linalg.norm(_signed(features, STRUCTURE_DIM))
        if full == 0:
            return np.zeros(STRUCTURE_DIM)
        scaled = {name: value * min(1.0, self.idf(name) / math.log(2)) for name, value in features.items()}
        return _signed(scaled, STRUCTURE_DIM) / full

    def transform_one(
        self, failure: Failure, parts: SignatureParts | None = None, semantics: np.ndarray | None = None
    ) -> np.ndarray:
        """`semantics` may be passed in when it was embedded in a batch (`learn_transform_many`)."""
        parts = parts or describe(failure)
        if semantics is None and self.embedder is not None:
            semantics = self.embedder.embed([parts.text])[0]
        if semantics is None:
            text = {term: math.log1p(weight) * self.idf(term) for term, weight in parts.text_terms.items()}
            semantics = _hashed(text, TEXT_DIM)
        traits = parts.traits.copy()
        node = failure.node
        norm = self.latency.get(f"{node.workflow_id}/{node.node_id}")
        if norm is not None and self.use_latency:
            traits[2] = norm.zscore(max(node.end_ns - node.start_ns, 0) / 1e6)
        return np.concatenate(
            [
                BLOCK_WEIGHTS["structure"] * self.structure(parts.structure),
                BLOCK_WEIGHTS["text"] * semantics,
                BLOCK_WEIGHTS["traits"] * traits,
            ]
        )

    def learn_transform_one(self, failure: Failure) -> tuple[np.ndarray, SignatureParts]:
        parts = describe(failure)
        self.learn_one(failure, parts)
        return self.transform_one(failure, parts), parts

    def learn_transform_many(self, failures: list[Failure]) -> list[tuple[np.ndarray, SignatureParts]]:
        """In stream order, with one embedder call for the whole batch (the model is the slow part)."""
        parts = [describe(failure) for failure in failures]
        embedded = (
            self.embedder.embed([p.text for p in parts]) if self.embedder is not None and parts else None
        )
        out = []
        for index, (failure, part) in enumerate(zip(failures, parts, strict=True)):
            self.learn_one(failure, part)
            semantics = embedded[index] if embedded is not None else None
            out.append((self.transform_one(failure, part, semantics), part))
        return out
