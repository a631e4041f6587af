"""The user tower in plain NumPy: the same function as the SavedModel, without TensorFlow
on the request path (a SavedModel call costs hundreds of µs even for one row).

It reads what training.numpy_export wrote into the model artifact and takes exactly the
inputs of contracts.inputs.user_inputs. Preprocessing is the training graph's:

* hashed categorical, bag, history (spec ``hash_buckets``): Keras ``Hashing(num_bins)``,
  FarmHash Fingerprint64(utf-8 id) mod num_bins for every id, which is the lookup below
  with an empty vocabulary and num_bins OOV buckets;
* categorical, bag, history: vocabulary lookup as Keras ``StringLookup`` does it — OOV
  indices first, [0, num_oov), then the vocabulary; with one OOV index every unknown id
  (including "") is row 0, with more an unknown id goes to bucket FarmHash
  Fingerprint64(utf-8 id) mod num_oov, as ``tf.strings.to_hash_bucket_fast`` computes it
  (pyfarmhash's C Fingerprint64, pinned against TensorFlow by the tests; no TensorFlow is
  imported here);
* categorical (not an id, not derived; format 3 "missing_row"): "" — a missing value —
  reads the table's last row, as training.model.MissingRow sends it (format 1 and 2: ""
  is an unknown id, an OOV bucket, as those models were trained);
* bag, history: mean of the embeddings of the non-"" ids, zeros for an all-"" row ("" is
  looked up as an extra all-zero row, so padding costs no hashing and no mask); a history
  of format 4 may instead divide the sum by sqrt(count) ("pooling" normalized_sum) and
  apply tanh ("activation"), as training.history does;
* numeric: NaN/±inf → the training mean, then (x - mean) / sqrt(variance), in float32,
  followed by a 1.0/0.0 missing column when the entry has "missing_indicator";
* sequence: the item lookup and table as a history's, then self-attention over the items,
  their positions and age buckets (input ``<name>_gaps``): retrieval.sequence_tower;
* concatenation in spec order, Dense layers (relu or linear), optional L2 normalisation;
* format 5 "linear" (training.linear_part): a table summed over the history's real ids
  ("pooling" sum), appended after the normalisation, so the output is not a unit vector.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import farmhash
import numpy as np

from contracts.errors import ArtifactError
from contracts.inputs import PAD
from contracts.model_manifest import (
    NUMPY_TOWER_ARRAYS,
    NUMPY_TOWER_FORMAT,
    NUMPY_TOWER_FORMAT_1,
    NUMPY_TOWER_FORMAT_2,
    NUMPY_TOWER_FORMAT_4,
    NUMPY_TOWER_FORMAT_5,
    NUMPY_TOWER_GRAPH,
    ModelManifest,
    load_model_manifest,
    verify_checksums,
)
from retrieval import mapped_cache
from retrieval.row_lookup import MISSING, IdRows
from retrieval.sequence_tower import SequenceEncoder

L2_EPSILON = 1e-12  # tf.math.l2_normalize's floor on the squared norm
# A small vocabulary's lookup of at most this many ids runs in Python, a pooled feature of
# at most FEW_ROWS rows pools each row apart: below these, NumPy's per-call overhead is
# most of the cost (benchmarks/batch_cost.py, the "tower" column at batches of 1-4).
FEW_IDS, FEW_ROWS = 64, 3
_FIRST = np.zeros(1, dtype=np.intp)  # reduceat of one run: the sum reduceat gives a batch


class NumpyUserTower:
    """Raw input dict (contracts.inputs.user_inputs) → user_emb [n, d] float32."""

    def __init__(self, graph: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                 cache_key: str | None = None) -> None:
        """``cache_key``: the arrays file's checksum; a vocabulary's id table is then kept
        in the id-table cache (retrieval.row_lookup) for other processes to map."""
        self.embedding_dim = int(graph["embedding_dim"])
        self.normalize = bool(graph["normalize"])
        self._encoders = [_encoder(entry, arrays, cache_key) for entry in graph["features"]]
        self._dense = [(arrays[f"{d['name']}.kernel"], arrays[f"{d['name']}.bias"],
                        d["activation"] == "relu") for d in graph["dense"]]
        linear = graph.get("linear")
        self._linear = None if linear is None else _Embedded(linear, arrays, cache_key)
        # unit vectors only without a linear part after the normalisation
        self.normalized_output = self.normalize and self._linear is None
        # a sequence encoder takes two inputs (ids, gaps); every other, its feature's name
        self._takes = [getattr(e, "input_names", (e.name,)) for e in self._encoders]
        self.input_names = tuple(name for names in self._takes for name in names)
        self._input_set = frozenset(self.input_names)

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
        key = str(manifest.files[NUMPY_TOWER_ARRAYS])[:32]
        graph, arrays = _read(manifest.path, key)
        try:
            tower = cls(graph, arrays, key)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(str(manifest.path / NUMPY_TOWER_GRAPH),
                                f"malformed NumPy user tower: {exc!r}") from exc
        _check_against_manifest(tower, manifest)
        return tower

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        if inputs.keys() != self._input_set:
            _refuse_names(inputs, self.input_names)
        x = np.concatenate([encode(*(inputs[name] for name in takes))
                            for encode, takes in zip(self._encoders, self._takes, strict=True)],
                           axis=1)
        for kernel, bias, relu in self._dense:
            x = x @ kernel + bias
            if relu:
                np.maximum(x, 0.0, out=x)
        if self.normalize:
            x = x / np.sqrt(np.maximum((x * x).sum(axis=1, keepdims=True), L2_EPSILON))
        if self._linear is not None:
            x = np.hstack([x, self._linear(inputs[self._linear.name])])
        return x.astype(np.float32, copy=False)


class _Lookup:
    """id string → row of its embedding table, as a Keras StringLookup without mask.
    ``pad_row``: the row "" goes to instead (bag and history padding)."""

    def __init__(self, vocabulary: list[str] | np.ndarray, num_oov: int,
                 pad_row: int | None = None, cache_key: str | None = None) -> None:
        if num_oov < 1:
            raise ValueError(f"num_oov must be >= 1 (got {num_oov})")
        self.rows = IdRows.cached(cache_key, lambda: (
            vocabulary, np.arange(num_oov, num_oov + len(vocabulary))))
        self.num_oov, self.pad_row = num_oov, pad_row

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """ids: object array of str, any shape → int64 rows of the same shape."""
        if self.rows.small is not None and ids.size <= FEW_IDS:
            return self._few(ids)
        rows = self.rows.rows(ids)
        if self.pad_row is not None:
            rows[ids == PAD] = self.pad_row
        unknown = np.flatnonzero(rows == MISSING)
        if unknown.size:
            flat = rows.reshape(-1)
            flat[unknown] = (0 if self.num_oov == 1 else
                             oov_buckets(ids.reshape(-1)[unknown].tolist(), self.num_oov))
        return rows

    def _few(self, ids: np.ndarray) -> np.ndarray:
        """``__call__`` for a few ids of a small vocabulary, in Python: the same rows
        without the half-dozen NumPy calls (a serving batch's categorical features)."""
        get, pad_row, num_oov = self.rows.small.get, self.pad_row, self.num_oov
        out = []
        for i in ids.ravel().tolist():
            if pad_row is not None and i == PAD:
                out.append(pad_row)
            elif (row := get(i) if isinstance(i, str) else None) is not None:
                out.append(row)
            else:
                out.append(0 if num_oov == 1 else oov_bucket(i, num_oov))
        return np.array(out, dtype=np.int64).reshape(ids.shape)


def oov_buckets(ids: list[str], num_oov: int) -> np.ndarray:
    """FarmHash Fingerprint64(utf-8 id) mod num_oov, as StringLookup hashes unknown ids
    (pyfarmhash's C fingerprint64 equals TensorFlow's; tests/test_numpy_tower.py)."""
    return np.array([oov_bucket(s, num_oov) for s in ids], np.int64)


def oov_bucket(id_: object, num_oov: int) -> int:
    """One id's bucket (oov_buckets)."""
    return farmhash.fingerprint64(str(id_)) % num_oov


class _Embedded:
    """categorical [n] → [n, d]; bag/history [n, L] → masked mean [n, d]."""

    def __init__(self, entry: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                 cache_key: str | None = None) -> None:
        self.name, self.pooled = entry["name"], entry["kind"] in ("bag", "history")
        self.max_length = int(entry["max_length"]) if self.pooled else None
        # format 4 (training.history): sum / n or sum / sqrt(n), then linear or tanh
        self.pooling, activation = entry.get("pooling", "mean"), entry.get("activation", "linear")
        if (self.pooling not in ("mean", "normalized_sum", "sum")
                or activation not in ("linear", "tanh")):
            raise ValueError(f"{self.name}: unknown pooling {self.pooling!r} or activation "
                             f"{activation!r}")
        self.tanh = activation == "tanh"
        if "hash_buckets" in entry:  # no vocabulary: every id is an "OOV" bucket
            vocabulary, num_oov = np.zeros(0, dtype="<U1"), int(entry["hash_buckets"])
        else:
            vocabulary, num_oov = _vocabulary(entry, arrays), int(entry["num_oov"])
        table = arrays[entry["embedding"]]
        missing = bool(entry.get("missing_row", False)) and not self.pooled
        if table.ndim != 2 or table.shape[0] != len(vocabulary) + num_oov + missing:
            raise ValueError(f"{entry['embedding']}: {table.shape[0]} rows for "
                             f"{len(vocabulary)} ids + {num_oov} OOV"
                             + " + 1 missing row" * missing)
        pad_row = len(table) - 1 if missing else None  # "" reads the missing value's row
        # used as loaded (memory-mapped when large, _read): a bag's padding is masked out
        # in __call__ rather than given a zero row, which would copy a 1M-row table
        self._table = table
        key = (f"tower-{cache_key}-{entry['vocabulary']}-{num_oov}"
               if cache_key and isinstance(entry.get("vocabulary"), str) else None)
        self.lookup = _Lookup(vocabulary, num_oov, None if self.pooled else pad_row, key)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=object)
        expected_ndim = 2 if self.pooled else 1
        if ids.ndim != expected_ndim or (self.pooled and ids.shape[1] != self.max_length):
            shape = f"[n, {self.max_length}]" if self.pooled else "[n]"
            raise ValueError(f"input {self.name!r}: expected shape {shape} (got {ids.shape})")
        if not self.pooled:
            return self._table.take(self.lookup(ids), axis=0)
        if len(ids) <= FEW_ROWS:
            return self._pool_rows(ids)
        real = ids != PAD  # [n, L]: the padding "" counts for nothing and is not looked up
        n_real = real.sum(axis=1)  # (a history's cap may be thousands, most of it padding)
        embedded = self._table.take(self.lookup(ids[real]), axis=0)  # [m, d], row-major
        # per row, the sum of its run of embedded rows; a zero row at the end so that a run
        # may start at m, and the rows without ids (reduceat gives one element there) zeroed
        starts = np.cumsum(n_real) - n_real
        padded = np.vstack([embedded, np.zeros((1, embedded.shape[1]), embedded.dtype)])
        total = np.add.reduceat(padded, starts, axis=0) * (n_real > 0)[:, np.newaxis]
        return self._pooled(total, np.maximum(n_real[:, np.newaxis].astype(np.float32),
                                              np.float32(1.0)))

    def _pool_rows(self, ids: np.ndarray) -> np.ndarray:
        """``__call__`` of a pooled feature for a few rows: each row's real ids summed
        apart, by ``reduceat`` as in a batch (``add.reduce`` rounds differently)."""
        rows = [[i for i in row if i != PAD] for row in ids.tolist()]
        out = np.zeros((len(rows), self._table.shape[1]), dtype=self._table.dtype)
        found = [i for row in rows for i in row]
        if not found:
            return out
        embedded = self._table.take(self.lookup(np.array(found, dtype=object)), axis=0)
        start = 0
        for r, row in enumerate(rows):
            if row:
                out[r] = np.add.reduceat(embedded[start : start + len(row)], _FIRST, axis=0)
                start += len(row)
        return self._pooled(out, np.array([[max(len(row), 1)] for row in rows],
                                          dtype=np.float32))

    def _pooled(self, total: np.ndarray, count: np.ndarray) -> np.ndarray:
        """Each row's sum of embeddings pooled as the layer pools; ``count``: [n, 1]
        float32, the ids of each row (at least 1)."""
        if self.pooling == "sum":
            return total
        pooled = total / (count if self.pooling == "mean" else np.sqrt(count))
        return np.tanh(pooled) if self.tanh else pooled


class _Numeric:
    """[n] float → [n, 1]: NaN/±inf → mean, then (x - mean) / sqrt(variance), float32;
    [n, 2] with the missing indicator (1.0 where the value was NaN/±inf) as column 1."""

    def __init__(self, entry: Mapping[str, Any]) -> None:
        self.name = entry["name"]
        self._mean = np.float32(entry["mean"])
        self._std = np.float32(np.sqrt(float(entry["variance"])))
        self._indicator = bool(entry.get("missing_indicator", False))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"input {self.name!r}: expected shape [n] (got {x.shape})")
        finite = np.isfinite(x)
        scaled = ((np.where(finite, x, self._mean) - self._mean) / self._std)[:, np.newaxis]
        if not self._indicator:
            return scaled
        return np.hstack([scaled, (~finite).astype(np.float32)[:, np.newaxis]])


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


def _encoder(entry: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
             cache_key: str | None = None):
    if entry["kind"] == "numeric":
        return _Numeric(entry)
    if entry["kind"] == "sequence":
        return _sequence(entry, arrays)
    if entry["kind"] in ("categorical", "bag", "history"):
        return _Embedded(entry, arrays, cache_key)
    raise ValueError(f"feature {entry['name']!r}: unknown kind {entry['kind']!r}")


def _sequence(entry: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> SequenceEncoder:
    """The item lookup (no padding row: the encoder masks "" itself) and the item table."""
    if "hash_buckets" in entry:
        vocabulary, num_oov = np.zeros(0, dtype="<U1"), int(entry["hash_buckets"])
    else:
        vocabulary, num_oov = _vocabulary(entry, arrays), int(entry["num_oov"])
    table = arrays[entry["embedding"]]
    if table.ndim != 2 or table.shape[0] != len(vocabulary) + num_oov:
        raise ValueError(f"{entry['embedding']}: {table.shape[0]} rows for "
                         f"{len(vocabulary)} ids + {num_oov} OOV")
    return SequenceEncoder(entry, arrays, _Lookup(vocabulary, num_oov), table)


def _refuse_names(inputs: Mapping[str, np.ndarray], names: tuple[str, ...]) -> None:
    missing = sorted(set(names) - inputs.keys())
    unknown = sorted(inputs.keys() - set(names))
    raise ValueError(f"user tower inputs: missing {missing}, unknown {unknown}; it takes "
                     f"{', '.join(names)} (build them with contracts.inputs.user_inputs)")


def _read(directory: Path, cache_key: str | None = None
          ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    graph_path, arrays_path = directory / NUMPY_TOWER_GRAPH, directory / NUMPY_TOWER_ARRAYS
    try:
        graph = json.loads(graph_path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(str(graph_path), f"cannot read the NumPy user tower: {exc}") from exc
    formats = (NUMPY_TOWER_FORMAT_5, NUMPY_TOWER_FORMAT_4, NUMPY_TOWER_FORMAT, NUMPY_TOWER_FORMAT_2,
               NUMPY_TOWER_FORMAT_1)
    if not isinstance(graph, dict) or graph.get("format") not in formats:
        got = graph.get("format") if isinstance(graph, dict) else type(graph).__name__
        raise ArtifactError(str(graph_path), f"format must be one of {', '.join(formats)} "
                            f"(got {got!r})")
    try:
        arrays = {name: _weights_or_ids(array)
                  for name, array in _load_npz(arrays_path, cache_key).items()}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ArtifactError(str(arrays_path), f"cannot read the NumPy user tower: {exc}") from exc
    return graph, arrays


MAP_BYTES = 1 << 20  # arrays this large are memory-mapped, not read


def _load_npz(path: Path, cache_key: str | None = None) -> dict[str, np.ndarray]:
    """The arrays of an .npz, the large ones memory-mapped read-only.

    ``np.savez`` stores each array uncompressed, as an .npy file inside the zip, so its
    bytes sit contiguous in the file and can be mapped: the workers of ``serve --workers``
    (and the old and new pair of a hot swap of the same model) then share one copy of a
    1M-row embedding table in the page cache instead of each reading its own. A member
    that does not start at an aligned offset (np.savez does not align them, and NumPy
    copies a whole unaligned array on each ``take``) is copied once, aligned, into the
    cache of retrieval.mapped_cache under ``cache_key`` (the file's checksum) and mapped
    from there; without a key or a cache it is read into memory, as are compressed and
    small members."""
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")

            def read(info: zipfile.ZipInfo = info) -> np.ndarray:
                with archive.open(info) as member:
                    return np.lib.format.read_array(member, allow_pickle=False)

            array = None
            if info.compress_type == zipfile.ZIP_STORED and info.file_size >= MAP_BYTES:
                array = _mapped_member(path, raw, info)
                if array is not None and not array.flags.aligned:
                    array = (mapped_cache.mapped_array(f"tower-{cache_key}-{name}", read)
                             if cache_key else None)
            arrays[name] = read() if array is None else array
    return arrays


def _mapped_member(path: Path, raw, info: zipfile.ZipInfo) -> np.ndarray | None:
    """A stored .npy member as a read-only memmap; None when it cannot be mapped."""
    raw.seek(info.header_offset)
    local = raw.read(30)  # the local file header: name and extra lengths at 26 and 28
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        return None
    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(
        local[28:30], "little")
    raw.seek(start)
    version = np.lib.format.read_magic(raw)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(raw)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(raw)
    else:
        return None
    if dtype.hasobject:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=raw.tell(), shape=shape,
                     order="F" if fortran else "C").view(np.ndarray)  # (as mapped_cache)


def _weights_or_ids(array: np.ndarray) -> np.ndarray:
    """Vocabularies stay string arrays; everything else is float32 weights."""
    return array if array.dtype.kind == "U" else np.asarray(array, dtype=np.float32)


def _check_against_manifest(tower: NumpyUserTower, manifest: ModelManifest) -> None:
    where = str(manifest.path / NUMPY_TOWER_GRAPH)
    # by name: the manifest's JSON has its features sorted, not in concatenation order
    expected = sorted(name for f in manifest.feature_spec.user_input_features
                      for name in f.input_names)
    if sorted(tower.input_names) != expected:
        raise ArtifactError(where, f"features {sorted(tower.input_names)} do not match the "
                            f"manifest's user inputs {expected}")
    if (tower.embedding_dim != manifest.embedding_dim
            or tower.normalized_output != manifest.normalized):
        raise ArtifactError(where, f"embedding_dim {tower.embedding_dim}, normalize "
                            f"{tower.normalized_output} do not match the manifest's "
                            f"{manifest.embedding_dim}, {manifest.normalized}")
