"""The numpy all-MiniLM-L6-v2 reproduces the model's published similarities, and signatures built on
it still separate planted failure modes."""

from __future__ import annotations

import numpy as np
import pytest
from fss_fixtures import planted_stream
from sklearn.metrics import adjusted_mutual_info_score

from cegraph.daemon.detect.density import EMBEDDED_MODE_DISTANCE, NOISE, ModeTracker
from cegraph.daemon.detect.embedding import shared_embedder
from cegraph.daemon.detect.signature import STRUCTURE_DIM, TRAITS_DIM, SignatureFeaturizer
from cegraph.daemon.settings import load_settings

pytestmark = pytest.mark.long(minutes=2.5)

# From the sentence-transformers documentation ("Semantic Textual Similarity"), all-MiniLM-L6-v2.
LEFT = ["The new movie is awesome", "The cat sits outside", "A man is playing guitar"]
RIGHT = ["The dog plays in the garden", "The new movie is so great", "A woman watches TV"]
PUBLISHED = [[0.0543, 0.8939, -0.0502], [0.2838, -0.0029, 0.1310], [0.2277, -0.0136, -0.0327]]


def test_published_similarities_are_reproduced():
    embedder = shared_embedder()
    left, right = embedder.embed(LEFT), embedder.embed(RIGHT)
    assert left.shape == (3, 384)
    assert np.allclose(np.linalg.norm(left, axis=1), 1.0, atol=1e-5)
    assert np.allclose(left @ right.T, PUBLISHED, atol=6e-4)
    batched = embedder.embed(LEFT + RIGHT)  # padding in a batch must not change a sentence's vector
    assert np.allclose(batched[:3], left, atol=1e-5)


def test_embedding_signatures_separate_planted_modes(monkeypatch):
    monkeypatch.setenv("CEGRAPH_DETECTOR__TEXT_FEATURES", "embedding")
    assert load_settings().detector.text_features == "embedding"
    stream = planted_stream(1_200, seed=21, modes={"calc": 1, "search": 1, "format": 1})
    featurizer = SignatureFeaturizer(shared_embedder())
    tracker = ModeTracker(mode_distance=EMBEDDED_MODE_DISTANCE)
    assert featurizer.dim == STRUCTURE_DIM + 384 + TRAITS_DIM
    assigned: list[str] = []
    for start in range(0, len(stream), 100):
        for vector, _ in featurizer.learn_transform_many([f for f, _ in stream[start : start + 100]]):
            tracker.learn_one(vector)
        assigned.extend(tracker.assign()[0])
    truth = [mode for _, mode in stream]
    later = range(300, len(stream))
    score = adjusted_mutual_info_score([truth[i] for i in later], [assigned[i] for i in later])
    assert score >= 0.9, score
    assert len({assigned[i] for i in later} - {NOISE}) == 3


@pytest.mark.parametrize("text", ["", "x" * 20_000])
def test_empty_and_very_long_texts_are_embedded(text):
    [vector] = shared_embedder().embed([text])
    assert vector.shape == (384,) and np.isfinite(vector).all()
