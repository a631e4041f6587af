"""A sequence feature's encoder in NumPy: training.sequence.SequenceEncoder, without
TensorFlow, from the arrays training.numpy_export writes.

Its entry in user_tower_numpy.json (the format of retrieval.numpy_tower, kind "sequence")::

    {"name", "kind": "sequence", "vocabulary"/"num_oov" or "hash_buckets", "embedding"
     (the item tower's table, shared), "max_length", "blocks", "heads", "time_buckets",
     "encoder": the layer's name}

and its arrays ``<encoder>.position`` [L, d], ``<encoder>.age`` [time_buckets + 1, d] and,
per block b, ``<encoder>.block<b>.<w>`` for w in training.sequence.BLOCK_WEIGHTS.

Only the most recent position's output is the feature, so the last block computes its
query, attention output and feed-forward layer for position 0 alone (keys and values still
cover the whole sequence): the same numbers as the full computation, L times less work in
that block. Projections are 2-d matmuls over all positions at once, q, k and v fused into
one (a stacked [n, L, d] @ [d, d] is several times slower in NumPy).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from contracts.inputs import PAD

LN_EPSILON = np.float32(1e-6)  # training.sequence.LN_EPSILON
MASKED = np.float32(-1e9)      # training.sequence.MASKED
BLOCK_WEIGHTS = ("wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "ln1_gamma", "ln1_beta",
                 "w1", "b1", "w2", "b2", "ln2_gamma", "ln2_beta")


class SequenceEncoder:
    """(ids [n, L] object str, gaps [n, L] int) → [n, d] float32."""

    def __init__(self, entry: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                 lookup: Callable[[np.ndarray], np.ndarray], table: np.ndarray) -> None:
        self.name, self.lookup = entry["name"], lookup
        self.gaps_name = entry["gaps"]
        self.input_names = (self.name, self.gaps_name)
        self.max_length, self.heads = int(entry["max_length"]), int(entry["heads"])
        prefix = entry["encoder"]
        self._table = np.asarray(table, np.float32)
        self._position = arrays[f"{prefix}.position"]
        self._age = arrays[f"{prefix}.age"]
        self._blocks = [_fused({w: arrays[f"{prefix}.block{b}.{w}"] for w in BLOCK_WEIGHTS})
                        for b in range(int(entry["blocks"]))]
        width = self._table.shape[1]
        if self._position.shape != (self.max_length, width) or width % self.heads:
            raise ValueError(f"{prefix}.position: expected [{self.max_length}, {width}] with "
                             f"{self.heads} heads dividing {width} (got "
                             f"{self._position.shape})")
        if self._age.shape != (int(entry["time_buckets"]) + 1, width):
            raise ValueError(f"{prefix}.age: expected [{int(entry['time_buckets']) + 1}, "
                             f"{width}] (got {self._age.shape})")

    def __call__(self, ids: np.ndarray, gaps: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=object)
        gaps = np.asarray(gaps)
        shape = (len(ids), self.max_length)
        if ids.ndim != 2 or ids.shape != shape or gaps.shape != shape:
            raise ValueError(f"inputs {self.name!r} and {self.gaps_name!r}: expected shape "
                             f"[n, {self.max_length}] (got {ids.shape} and {gaps.shape})")
        if gaps.size and (gaps.min() < 0 or gaps.max() >= len(self._age)):
            raise ValueError(f"input {self.gaps_name!r}: buckets must be in [0, "
                             f"{len(self._age) - 1}] (got {gaps.min()}..{gaps.max()})")
        present = (ids != PAD).astype(np.float32)                      # [n, L]
        x = self._table[self.lookup(ids)] + self._position + self._age[gaps]
        x *= present[..., np.newaxis]
        bias = ((1.0 - present) * MASKED)[:, np.newaxis, np.newaxis, :]  # [n, 1, 1, L]
        for b, w in enumerate(self._blocks):
            last = b == len(self._blocks) - 1
            x = self._block(x, bias, w, last)
        return (x[:, 0, :] * present[:, :1]).astype(np.float32, copy=False)

    def _block(self, x: np.ndarray, bias: np.ndarray, w: Mapping[str, np.ndarray],
               last: bool) -> np.ndarray:
        """x [n, L, d] → [n, L, d], or [n, 1, d] (position 0 only) for the last block."""
        n, length, width = x.shape
        flat = x.reshape(n * length, width)
        if last:  # queries of position 0 only; keys and values of every position
            q = x[:, 0, :] @ w["wq"] + w["bq"]
            kv = (flat @ w["wkv"] + w["bkv"]).reshape(n, length, 2 * width)
            query, q = x[:, :1, :], q.reshape(n, 1, width)
            k, v = kv[..., :width], kv[..., width:]
        else:
            qkv = (flat @ w["wqkv"] + w["bqkv"]).reshape(n, length, 3 * width)
            query, q, k, v = x, qkv[..., :width], qkv[..., width:2 * width], qkv[..., 2 * width:]
        attended = self._attend(self._split(q), self._split(k), self._split(v), bias)
        rows = query.shape[1]
        out = attended.reshape(n * rows, width) @ w["wo"] + w["bo"]
        h = _layer_norm(query.reshape(n * rows, width) + out, w["ln1_gamma"], w["ln1_beta"])
        ffn = np.maximum(h @ w["w1"] + w["b1"], 0.0) @ w["w2"] + w["b2"]
        return _layer_norm(h + ffn, w["ln2_gamma"], w["ln2_beta"]).reshape(n, rows, width)

    def _attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                bias: np.ndarray) -> np.ndarray:
        """q [n, h, Q, dh], k and v [n, h, L, dh] → [n, Q, h·dh]."""
        logits = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(q.shape[-1])) + bias
        logits -= logits.max(axis=-1, keepdims=True)
        weights = np.exp(logits)
        weights /= weights.sum(axis=-1, keepdims=True)
        out = weights @ v                                             # [n, h, Q, dh]
        n, heads, rows, dh = out.shape
        return out.transpose(0, 2, 1, 3).reshape(n, rows, heads * dh)

    def _split(self, x: np.ndarray) -> np.ndarray:
        n, length, width = x.shape
        return x.reshape(n, length, self.heads, width // self.heads).transpose(0, 2, 1, 3)


def _fused(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One matmul for q, k and v (and for k and v in the last block)."""
    return {**w, "wqkv": np.hstack([w["wq"], w["wk"], w["wv"]]),
            "bqkv": np.concatenate([w["bq"], w["bk"], w["bv"]]),
            "wkv": np.hstack([w["wk"], w["wv"]]), "bkv": np.concatenate([w["bk"], w["bv"]])}


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + LN_EPSILON) * gamma + beta
