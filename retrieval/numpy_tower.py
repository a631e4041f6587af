"""The user tower in plain NumPy: the same function as the SavedModel, without TensorFlow
on the request path (a SavedModel call costs hundreds of µs even for one row).

It reads what training.numpy_export wrote into the model artifact and takes exactly the
inputs of contracts.inputs.user_inputs. Preprocessing is the training graph's:

* categorical, bag, history: vocabulary lookup as Keras ``StringLookup`` does it — OOV
  indices first, [0, num_oov), then the vocabulary; with one OOV index every unknown id
  (including "") is row 0, with more an unknown id goes to bucket FarmHash
  Fingerprint64(utf-8 id) mod num_oov, as ``tf.strings.to_hash_bucket_fast`` computes it
  (a pure-Python Fingerprint64 is at the end of this module, pinned against TensorFlow by
  the tests; no TensorFlow is imported here);
* bag, history: mean of the embeddings of the non-"" ids, zeros for an all-"" row ("" is
  looked up as an extra all-zero row, so padding costs no hashing and no mask);
* numeric: NaN/±inf → the training mean, then (x - mean) / sqrt(variance), in float32;
* concatenation in spec order, Dense layers (relu or linear), optional L2 normalisation.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.row_lookup import rows_by_id
from contracts.errors import ArtifactError
from contracts.inputs import PAD
from contracts.model_manifest import (
    NUMPY_TOWER_ARRAYS,
    NUMPY_TOWER_FORMAT,
    NUMPY_TOWER_FORMAT_1,
    NUMPY_TOWER_GRAPH,
    ModelManifest,
    load_model_manifest,
    verify_checksums,
)

L2_EPSILON = 1e-12  # tf.math.l2_normalize's floor on the squared norm


class NumpyUserTower:
    """Raw input dict (contracts.inputs.user_inputs) → user_emb [n, d] float32."""

    def __init__(self, graph: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        self.embedding_dim = int(graph["embedding_dim"])
        self.normalize = bool(graph["normalize"])
        self._encoders = [_encoder(entry, arrays) for entry in graph["features"]]
        self._dense = [(arrays[f"{d['name']}.kernel"], arrays[f"{d['name']}.bias"],
                        d["activation"] == "relu") for d in graph["dense"]]
        self.input_names = tuple(e.name for e in self._encoders)
        self._input_set = frozenset(self.input_names)

    def id_tables(self) -> list[dict]:
        """The vocabularies' id → row dicts (retrieval.swap empties them when retiring)."""
        return [e.lookup.rows for e in self._encoders if isinstance(e, _Embedded)]

    @classmethod
    def load(cls, model_dir: str | Path) -> NumpyUserTower:
        """From a model artifact directory; checks the two files against its manifest."""
        return cls.from_manifest(load_model_manifest(model_dir, verify=False))

    @classmethod
    def from_manifest(cls, manifest: ModelManifest) -> NumpyUserTower:
        files = (NUMPY_TOWER_GRAPH, NUMPY_TOWER_ARRAYS)
        unlisted = [name for name in files if name not in manifest.files]
        if unlisted:
            raise ArtifactError(str(manifest.path / "manifest.json"),
                                f"lists no {' or '.join(unlisted)}: the model was exported "
                                "without a NumPy user tower; export it again")
        verify_checksums(manifest.path, {name: manifest.files[name] for name in files})
        graph, arrays = _read(manifest.path)
        try:
            tower = cls(graph, arrays)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(str(manifest.path / NUMPY_TOWER_GRAPH),
                                f"malformed NumPy user tower: {exc!r}") from exc
        _check_against_manifest(tower, manifest)
        return tower

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        if inputs.keys() != self._input_set:
            _refuse_names(inputs, self.input_names)
        x = np.concatenate([encode(inputs[encode.name]) for encode in self._encoders], axis=1)
        for kernel, bias, relu in self._dense:
            x = x @ kernel + bias
            if relu:
                np.maximum(x, 0.0, out=x)
        if self.normalize:
            x = x / np.sqrt(np.maximum((x * x).sum(axis=1, keepdims=True), L2_EPSILON))
        return x.astype(np.float32, copy=False)


class _Lookup:
    """id string → row of its embedding table, as a Keras StringLookup without mask.
    ``pad_row``: the row "" goes to instead (bag and history padding)."""

    def __init__(self, vocabulary: list[str] | np.ndarray, num_oov: int,
                 pad_row: int | None = None) -> None:
        if num_oov < 1:
            raise ValueError(f"num_oov must be >= 1 (got {num_oov})")
        self.rows = rows_by_id(vocabulary, range(num_oov, num_oov + len(vocabulary)))
        if pad_row is not None:
            self.rows[PAD] = pad_row
        self.num_oov = num_oov

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """ids: object array of str, any shape → int64 rows of the same shape."""
        flat = ids.ravel().tolist()
        get = self.rows.get
        if self.num_oov == 1:
            return np.array([get(s, 0) for s in flat], np.int64).reshape(ids.shape)
        rows = np.array([get(s, -1) for s in flat], np.int64)
        unknown = np.flatnonzero(rows < 0)
        if unknown.size:
            rows[unknown] = oov_buckets([flat[i] for i in unknown], self.num_oov)
        return rows.reshape(ids.shape)


def oov_buckets(ids: list[str], num_oov: int) -> np.ndarray:
    """FarmHash Fingerprint64(utf-8 id) mod num_oov, as StringLookup hashes unknown ids."""
    return np.array([fingerprint64(str(s).encode()) % num_oov for s in ids], np.int64)


class _Embedded:
    """categorical [n] → [n, d]; bag/history [n, L] → masked mean [n, d]."""

    def __init__(self, entry: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        self.name, self.pooled = entry["name"], entry["kind"] in ("bag", "history")
        self.max_length = int(entry["max_length"]) if self.pooled else None
        vocabulary, num_oov = _vocabulary(entry, arrays), int(entry["num_oov"])
        table = arrays[entry["embedding"]]
        if table.ndim != 2 or table.shape[0] != len(vocabulary) + num_oov:
            raise ValueError(f"{entry['embedding']}: {table.shape[0]} rows for "
                             f"{len(vocabulary)} ids + {num_oov} OOV")
        pad_row = None
        if self.pooled:  # "" reads an extra zero row; a last column of 1s (0 for "")
            pad_row = len(table)  # makes the pooled sum carry the count of real ids
            table = np.vstack([np.hstack([table, np.ones((len(table), 1), np.float32)]),
                               np.zeros((1, table.shape[1] + 1), np.float32)])
        self._table = table
        self.lookup = _Lookup(vocabulary, num_oov, pad_row)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=object)
        expected_ndim = 2 if self.pooled else 1
        if ids.ndim != expected_ndim or (self.pooled and ids.shape[1] != self.max_length):
            shape = "[n, %d]" % self.max_length if self.pooled else "[n]"
            raise ValueError(f"input {self.name!r}: expected shape {shape} (got {ids.shape})")
        embedded = self._table.take(self.lookup(ids), axis=0)
        if not self.pooled:
            return embedded
        total = embedded.sum(axis=1)
        return total[:, :-1] / np.maximum(total[:, -1:], np.float32(1.0))


class _Numeric:
    """[n] float → [n, 1]: NaN/±inf → mean, then (x - mean) / sqrt(variance), float32."""

    def __init__(self, entry: Mapping[str, Any]) -> None:
        self.name = entry["name"]
        self._mean = np.float32(entry["mean"])
        self._std = np.float32(np.sqrt(float(entry["variance"])))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"input {self.name!r}: expected shape [n] (got {x.shape})")
        x = np.where(np.isfinite(x), x, self._mean)
        return ((x - self._mean) / self._std)[:, np.newaxis]


def _vocabulary(entry: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
                ) -> list[str] | np.ndarray:
    """Format 2: the name of a string array of the .npz; format 1: a JSON list."""
    named = entry["vocabulary"]
    if not isinstance(named, str):
        return list(named)
    vocabulary = arrays[named]
    if vocabulary.ndim != 1 or vocabulary.dtype.kind != "U":
        raise ValueError(f"{named}: expected a 1-d string array (got {vocabulary.dtype} "
                         f"{vocabulary.shape})")
    return vocabulary


def _encoder(entry: Mapping[str, Any], arrays: Mapping[str, np.ndarray]):
    if entry["kind"] == "numeric":
        return _Numeric(entry)
    if entry["kind"] in ("categorical", "bag", "history"):
        return _Embedded(entry, arrays)
    raise ValueError(f"feature {entry['name']!r}: unknown kind {entry['kind']!r}")


def _refuse_names(inputs: Mapping[str, np.ndarray], names: tuple[str, ...]) -> None:
    missing = sorted(set(names) - inputs.keys())
    unknown = sorted(inputs.keys() - set(names))
    raise ValueError(f"user tower inputs: missing {missing}, unknown {unknown}; it takes "
                     f"{', '.join(names)} (build them with contracts.inputs.user_inputs)")


def _read(directory: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    graph_path, arrays_path = directory / NUMPY_TOWER_GRAPH, directory / NUMPY_TOWER_ARRAYS
    try:
        graph = json.loads(graph_path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(str(graph_path), f"cannot read the NumPy user tower: {exc}") from exc
    formats = (NUMPY_TOWER_FORMAT, NUMPY_TOWER_FORMAT_1)
    if not isinstance(graph, dict) or graph.get("format") not in formats:
        got = graph.get("format") if isinstance(graph, dict) else type(graph).__name__
        raise ArtifactError(str(graph_path), f"format must be one of {', '.join(formats)} "
                            f"(got {got!r})")
    try:
        with np.load(arrays_path, allow_pickle=False) as npz:
            arrays = {name: _weights_or_ids(npz[name]) for name in npz.files}
    except (OSError, ValueError) as exc:
        raise ArtifactError(str(arrays_path), f"cannot read the NumPy user tower: {exc}") from exc
    return graph, arrays


def _weights_or_ids(array: np.ndarray) -> np.ndarray:
    """Vocabularies stay string arrays; everything else is float32 weights."""
    return array if array.dtype.kind == "U" else np.asarray(array, dtype=np.float32)


def _check_against_manifest(tower: NumpyUserTower, manifest: ModelManifest) -> None:
    where = str(manifest.path / NUMPY_TOWER_GRAPH)
    # by name: the manifest's JSON has its features sorted, not in concatenation order
    expected = sorted(f.name for f in manifest.feature_spec.user_input_features)
    if sorted(tower.input_names) != expected:
        raise ArtifactError(where, f"features {sorted(tower.input_names)} do not match the "
                            f"manifest's user inputs {expected}")
    if tower.embedding_dim != manifest.embedding_dim or tower.normalize != manifest.normalized:
        raise ArtifactError(where, f"embedding_dim {tower.embedding_dim}, normalize "
                            f"{tower.normalize} do not match the manifest's "
                            f"{manifest.embedding_dim}, {manifest.normalized}")


# --- FarmHash Fingerprint64 (farmhashna::Hash64 of google/farmhash), in pure Python --------
# Unsigned 64-bit arithmetic is Python ints masked with _M; fetches are little-endian.

_M = (1 << 64) - 1
_K0, _K1, _K2 = 0xC3A5C85C97CB3127, 0xB492B66FBE98F273, 0x9AE16A3B2F90404F


def _f64(s, i):
    return int.from_bytes(s[i:i + 8], "little")


def _f32(s, i):
    return int.from_bytes(s[i:i + 4], "little")


def _rot(v, shift):
    return ((v >> shift) | (v << (64 - shift))) & _M


def _shift_mix(v):
    return v ^ (v >> 47)


def _len16(u, v, mul):
    a = ((u ^ v) * mul) & _M
    a ^= a >> 47
    b = ((v ^ a) * mul) & _M
    b ^= b >> 47
    return (b * mul) & _M


def _len0to16(s, n):
    if n >= 8:
        mul = _K2 + n * 2
        a = (_f64(s, 0) + _K2) & _M
        b = _f64(s, n - 8)
        c = (_rot(b, 37) * mul + a) & _M
        d = ((_rot(a, 25) + b) * mul) & _M
        return _len16(c, d, mul)
    if n >= 4:
        mul = _K2 + n * 2
        return _len16(n + (_f32(s, 0) << 3), _f32(s, n - 4), mul)
    if n > 0:
        y = s[0] + (s[n >> 1] << 8)
        z = n + (s[n - 1] << 2)
        return (_shift_mix(((y * _K2) ^ (z * _K0)) & _M) * _K2) & _M
    return _K2


def _len17to32(s, n):
    mul = _K2 + n * 2
    a = (_f64(s, 0) * _K1) & _M
    b = _f64(s, 8)
    c = (_f64(s, n - 8) * mul) & _M
    d = (_f64(s, n - 16) * _K2) & _M
    return _len16((_rot((a + b) & _M, 43) + _rot(c, 30) + d) & _M,
                  (a + _rot((b + _K2) & _M, 18) + c) & _M, mul)


def _len33to64(s, n):
    mul = _K2 + n * 2
    a = (_f64(s, 0) * _K2) & _M
    b = _f64(s, 8)
    c = (_f64(s, n - 8) * mul) & _M
    d = (_f64(s, n - 16) * _K2) & _M
    y = (_rot((a + b) & _M, 43) + _rot(c, 30) + d) & _M
    z = _len16(y, (a + _rot((b + _K2) & _M, 18) + c) & _M, mul)
    e = (_f64(s, 16) * mul) & _M
    f = _f64(s, 24)
    g = ((y + _f64(s, n - 32)) * mul) & _M
    h = ((z + _f64(s, n - 24)) * mul) & _M
    return _len16((_rot((e + f) & _M, 43) + _rot(g, 30) + h) & _M,
                  (e + _rot((f + a) & _M, 18) + g) & _M, mul)


def _weak32(s, i, a, b):
    w, x, y, z = _f64(s, i), _f64(s, i + 8), _f64(s, i + 16), _f64(s, i + 24)
    a = (a + w) & _M
    b = _rot((b + a + z) & _M, 21)
    c = a
    a = (a + x + y) & _M
    b = (b + _rot(a, 44)) & _M
    return (a + z) & _M, (b + c) & _M


def fingerprint64(s: bytes) -> int:
    """FarmHash Fingerprint64 (farmhashna::Hash64), TensorFlow's string fingerprint."""
    n = len(s)
    if n <= 16:
        return _len0to16(s, n)
    if n <= 32:
        return _len17to32(s, n)
    if n <= 64:
        return _len33to64(s, n)
    seed = 81
    x = seed
    y = (seed * _K1 + 113) & _M
    z = (_shift_mix((y * _K2 + 113) & _M) * _K2) & _M
    v0 = v1 = w0 = w1 = 0
    x = (x * _K2 + _f64(s, 0)) & _M
    end = ((n - 1) // 64) * 64
    last64 = end + ((n - 1) & 63) - 63
    i = 0
    while True:
        x = (_rot((x + y + v0 + _f64(s, i + 8)) & _M, 37) * _K1) & _M
        y = (_rot((y + v1 + _f64(s, i + 48)) & _M, 42) * _K1) & _M
        x ^= w1
        y = (y + v0 + _f64(s, i + 40)) & _M
        z = (_rot((z + w0) & _M, 33) * _K1) & _M
        v0, v1 = _weak32(s, i, (v1 * _K1) & _M, (x + w0) & _M)
        w0, w1 = _weak32(s, i + 32, (z + w1) & _M, (y + _f64(s, i + 16)) & _M)
        z, x = x, z
        i += 64
        if i == end:
            break
    mul = _K1 + ((z & 0xFF) << 1)
    i = last64
    w0 = (w0 + ((n - 1) & 63)) & _M
    v0 = (v0 + w0) & _M
    w0 = (w0 + v0) & _M
    x = (_rot((x + y + v0 + _f64(s, i + 8)) & _M, 37) * mul) & _M
    y = (_rot((y + v1 + _f64(s, i + 48)) & _M, 42) * mul) & _M
    x ^= (w1 * 9) & _M
    y = (y + v0 * 9 + _f64(s, i + 40)) & _M
    z = (_rot((z + w0) & _M, 33) * mul) & _M
    v0, v1 = _weak32(s, i, (v1 * mul) & _M, (x + w0) & _M)
    w0, w1 = _weak32(s, i + 32, (z + w1) & _M, (y + _f64(s, i + 16)) & _M)
    z, x = x, z
    return _len16((_len16(v0, w0, mul) + _shift_mix(y) * _K0 + z) & _M,
                  (_len16(v1, w1, mul) + x) & _M, mul)
