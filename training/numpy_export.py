"""The user tower as plain arrays and a layer graph, for serving without TensorFlow.

Two files next to the SavedModel in a model artifact (read by retrieval.numpy_tower)::

    user_tower_numpy.npz    embedding tables by layer name ("user_id_embedding"), dense
                            weights as "<layer>.kernel" [in, out] / "<layer>.bias" [out],
                            float32; each id feature's vocabulary as "<feature>.vocabulary",
                            a NumPy string array; no pickled objects
    user_tower_numpy.json   {"format", "embedding_dim", "normalize",
                             "features": [one per concatenated encoding, in order:
                                 {"name", "kind", "vocabulary" (the array's name),
                                  "num_oov", "embedding", "max_length" (bag and history),
                                  "missing_row": true when "" reads the table's last row},
                                 hashed (spec hash_buckets), "hash_buckets" in place of
                                 "vocabulary" and "num_oov",
                                 or, numeric, {"name", "kind", "mean", "variance",
                                 "missing_indicator": true when a 0/1 column follows}],
                             "dense": [{"name", "activation"}, ...] in order}

Format 1 held each vocabulary in the JSON as a list of strings. A server parses that JSON
in one C call holding the GIL (0.07-0.2 s for a 1M-id history vocabulary, stalling the
calls it serves during a hot swap); an array is read from the .npz without building a
Python object per id. Format 3 added "missing_row" and "missing_indicator" (a format-2
reader would misread them). Format 4, written only when a history uses them, adds a
history's "pooling" (mean | normalized_sum) and "activation" (linear | tanh) from
training.history; its own table ("history_table" own) is just another "embedding" name.
Format 5, written only by a model with a linear part (training.linear_part), adds
"linear": a history entry whose table ("linear_user_part", the item-id lookup's rows) is
summed ("pooling" sum) and appended after the normalisation; "embedding_dim" is then the
whole width. retrieval.numpy_tower reads all five formats.

Everything is read from the trained Keras layers by name (as training.model.Towers names
them), except the numeric means and variances, which the model holds as constants of its
graph: those come from the FeatureStats it was built with. A layer the NumPy tower could
not reproduce is refused at export, not discovered at serving.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from contracts.feature_spec import Feature, FeatureSpec
from contracts.model_manifest import (NUMPY_TOWER_ARRAYS, NUMPY_TOWER_FORMAT,
                                      NUMPY_TOWER_FORMAT_4, NUMPY_TOWER_FORMAT_5,
                                      NUMPY_TOWER_GRAPH)

if TYPE_CHECKING:  # training.model imports TensorFlow; the file names here must not
    from training.model import FeatureStats

ACTIVATIONS = ("linear", "relu")
MIN_VARIANCE = 1e-12  # training.model.Towers floors the variance at this before sqrt
_LAYER_TYPES = {"InputLayer", "TFOpLambda", "StringLookup", "Hashing", "Embedding",
                "Reshape", "MaskedMeanPool", "Concatenate", "Dense", "L2Normalize",
                "MissingRow", "MissingIndicator", "SequenceEncoder"}
# the ops of the numeric encoder: where(is_finite(x), x, mean), then (x - mean) / std
_NUMERIC_OPS = {"math.is_finite", "where", "math.subtract", "math.truediv"}
_LAYER_TYPES |= {"HistoryKeep", "HistoryPool"}  # training.history's encoder


def export_numpy_user_tower(user_tower, spec: FeatureSpec, stats: FeatureStats,
                            path: Path, linear: dict[str, Any] | None = None) -> None:
    """Write user_tower_numpy.{npz,json} into the directory ``path``. ``linear``: a linear
    part's {"feature": the history's name, "table": [lookup rows, r] float32}.

    Raises ValueError when the tower holds a layer the NumPy tower cannot reproduce or its
    concatenation order is not ``spec.user_input_features``.
    """
    _check_layer_types(user_tower)
    _check_concat_order(user_tower, spec.user_input_features)
    arrays: dict[str, np.ndarray] = {}
    features = [_feature_entry(user_tower, spec, stats, f, arrays)
                for f in spec.user_input_features]
    dense = _dense_entries(user_tower, arrays)
    width = sum(_width(e, arrays) for e in features)
    if dense and arrays[f"{dense[0]['name']}.kernel"].shape[0] != width:
        raise ValueError(f"{dense[0]['name']}: kernel takes "
                         f"{arrays[dense[0]['name'] + '.kernel'].shape[0]} inputs but the "
                         f"encodings are {width} wide")
    graph = {
        # format 4 only when a history has options a format-3 reader would not apply
        "format": NUMPY_TOWER_FORMAT_4 if any("pooling" in e for e in features)
        else NUMPY_TOWER_FORMAT,
        "embedding_dim": int(user_tower.output.shape[-1]),
        "normalize": _has_layer(user_tower, f"{user_tower.name}_l2"),
        "features": features,
        "dense": dense,
    }
    if linear is not None:
        history = next(e for e in features if e["name"] == linear["feature"])
        table = np.asarray(linear["table"], np.float32)
        if table.shape[0] != len(arrays[history["vocabulary"]]) + history["num_oov"]:
            raise ValueError(f"linear part: {table.shape[0]} rows for the item lookup's "
                             f"{len(arrays[history['vocabulary']])} ids + "
                             f"{history['num_oov']} OOV")
        arrays["linear_user_part"] = table
        graph["linear"] = {**{k: history[k] for k in ("name", "kind", "vocabulary",
                                                      "num_oov", "max_length")},
                           "embedding": "linear_user_part", "pooling": "sum"}
        graph["format"] = NUMPY_TOWER_FORMAT_5
        graph["embedding_dim"] += int(table.shape[1])
    path = Path(path)
    with open(path / NUMPY_TOWER_ARRAYS, "wb") as fh:
        np.savez(fh, **arrays)
    (path / NUMPY_TOWER_GRAPH).write_text(json.dumps(graph, indent=1))


def _feature_entry(tower, spec: FeatureSpec, stats: FeatureStats, f: Feature,
                   arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    if f.kind == "numeric":
        entry = {"name": f.name, "kind": f.kind, "mean": float(stats.means[f.name]),
                 "variance": max(float(stats.variances[f.name]), MIN_VARIANCE)}
        return {**entry, "missing_indicator": True} if f.missing_indicator else entry
    # history and sequence share the item-id lookup and embedding with the item tower
    owner = spec.columns.item_id if f.kind in ("history", "sequence") else f.name
    lookup = tower.get_layer(f"{owner}_lookup")
    own = f.kind == "history" and _has_layer(tower, f"{f.name}_embedding")
    embedding = tower.get_layer(f"{f.name if own else owner}_embedding")  # own: history_table
    missing = f.has_missing_row(spec)  # training.model.MissingRow: "" → the last row
    if type(lookup).__name__ == "Hashing":
        entry = _hashed_entry(f, lookup, embedding, arrays, missing)
    else:
        entry = _vocabulary_entry(f, lookup, embedding, arrays, missing)
    if missing:
        entry["missing_row"] = True
    if f.kind == "history" and _has_layer(tower, f"{f.name}_pool"):
        pool = tower.get_layer(f"{f.name}_pool")
        if type(pool).__name__ == "HistoryPool":  # training.history; MaskedMeanPool: mean
            entry.update(pooling=pool.pooling, activation=pool.activation)
    if f.kind == "sequence":
        entry.update(_sequence_entry(tower, f, arrays))
    return {**entry, "max_length": f.max_length} if f.is_sequence else entry


def _sequence_entry(tower, f: Feature, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """training.sequence.SequenceEncoder's weights (retrieval.sequence_tower's layout)."""
    from training.sequence import BLOCK_WEIGHTS

    layer = tower.get_layer(f"{f.name}_sequence")
    weights = layer.weights_in_order()
    arrays[f"{layer.name}.position"], arrays[f"{layer.name}.age"] = weights[:2]
    for i, array in enumerate(weights[2:]):
        arrays[f"{layer.name}.block{i // len(BLOCK_WEIGHTS)}."
               f"{BLOCK_WEIGHTS[i % len(BLOCK_WEIGHTS)]}"] = array
    return {"encoder": layer.name, "gaps": f.input_names[1], "blocks": layer.blocks,
            "heads": layer.heads, "time_buckets": layer.time_buckets}


def _vocabulary_entry(f: Feature, lookup, embedding, arrays: dict[str, np.ndarray],
                      missing: bool) -> dict[str, Any]:
    num_oov = int(lookup.num_oov_indices)
    if lookup.mask_token is not None or num_oov < 1:
        raise ValueError(f"{lookup.name}: expected no mask token and >= 1 OOV index "
                         f"(got mask_token={lookup.mask_token!r}, num_oov_indices={num_oov})")
    vocabulary = [str(v) for v in lookup.get_vocabulary()[num_oov:]]
    table = np.asarray(embedding.get_weights()[0], dtype=np.float32)
    if table.shape[0] != len(vocabulary) + num_oov + missing:
        raise ValueError(f"{embedding.name}: {table.shape[0]} rows but the vocabulary has "
                         f"{len(vocabulary)} ids + {num_oov} OOV buckets"
                         + " + 1 missing row" * missing)
    arrays[embedding.name] = table
    arrays[f"{f.name}.vocabulary"] = _string_array(vocabulary, lookup.name)
    return {"name": f.name, "kind": f.kind, "vocabulary": f"{f.name}.vocabulary",
            "num_oov": num_oov, "embedding": embedding.name}


def _hashed_entry(f: Feature, lookup, embedding, arrays: dict[str, np.ndarray],
                  missing: bool) -> dict[str, Any]:
    """FarmHash Fingerprint64 mod num_bins, which the NumPy tower computes only unsalted."""
    num_bins = int(lookup.num_bins)
    if lookup.salt is not None or lookup.mask_value is not None:
        raise ValueError(f"{lookup.name}: expected an unsalted Hashing without mask value "
                         f"(got salt={lookup.salt!r}, mask_value={lookup.mask_value!r})")
    table = np.asarray(embedding.get_weights()[0], dtype=np.float32)
    if table.shape[0] != num_bins + missing:
        raise ValueError(f"{embedding.name}: {table.shape[0]} rows for {num_bins} hash buckets"
                         + " + 1 missing row" * missing)
    arrays[embedding.name] = table
    return {"name": f.name, "kind": f.kind, "hash_buckets": num_bins,
            "embedding": embedding.name}


def _string_array(vocabulary: list[str], where: str) -> np.ndarray:
    """The vocabulary as a NumPy string array, which must give back exactly these ids
    (NumPy drops trailing NUL characters)."""
    array = np.array(vocabulary, dtype=str) if vocabulary else np.zeros(0, dtype="<U1")
    if array.tolist() != vocabulary:
        raise ValueError(f"{where}: an id ends with a NUL character, which a NumPy string "
                         "array cannot hold")
    return array


def _dense_entries(tower, arrays: dict[str, np.ndarray]) -> list[dict[str, str]]:
    names = []
    while _has_layer(tower, f"{tower.name}_hidden{len(names)}"):
        names.append(f"{tower.name}_hidden{len(names)}")
    if _has_layer(tower, f"{tower.name}_out"):
        names.append(f"{tower.name}_out")
    found = sum(type(layer).__name__ == "Dense" for layer in tower.layers)
    if found != len(names):
        raise ValueError(f"{tower.name}: {found} Dense layers, but only {names} are named "
                         f"as training.model.Towers names them")
    entries = []
    for name in names:
        layer = tower.get_layer(name)
        activation = layer.activation.__name__
        if activation not in ACTIVATIONS or not layer.use_bias:
            raise ValueError(f"{name}: expected a biased Dense with activation in "
                             f"{ACTIVATIONS} (got {activation!r}, use_bias={layer.use_bias})")
        kernel, bias = layer.get_weights()
        arrays[f"{name}.kernel"] = np.asarray(kernel, np.float32)
        arrays[f"{name}.bias"] = np.asarray(bias, np.float32)
        entries.append({"name": name, "activation": activation})
    return entries


def _width(entry: dict[str, Any], arrays: dict[str, np.ndarray]) -> int:
    if entry["kind"] == "numeric":
        return 2 if entry.get("missing_indicator") else 1
    return arrays[entry["embedding"]].shape[1]


def _has_layer(tower, name: str) -> bool:
    return any(layer.name == name for layer in tower.layers)


def _check_layer_types(tower) -> None:
    unknown = sorted({type(layer).__name__ for layer in tower.layers} - _LAYER_TYPES)
    if unknown:
        raise ValueError(f"{tower.name}: the NumPy tower cannot reproduce layers of type "
                         f"{', '.join(unknown)}; it knows {', '.join(sorted(_LAYER_TYPES))}")
    ops = {layer.symbol for layer in tower.layers if type(layer).__name__ == "TFOpLambda"}
    if not ops <= _NUMERIC_OPS:
        raise ValueError(f"{tower.name}: the NumPy tower cannot reproduce the ops "
                         f"{', '.join(sorted(map(str, ops - _NUMERIC_OPS)))}")


def _check_concat_order(tower, features: tuple[Feature, ...]) -> None:
    """Each input of the Concatenate must depend on exactly the feature at its position."""
    concats = [layer for layer in tower.layers if type(layer).__name__ == "Concatenate"]
    expected = [set(f.input_names) for f in features for _ in range(1 + f.missing_indicator)]
    if len(expected) == 1 and not concats:
        return
    if len(concats) != 1:
        raise ValueError(f"{tower.name}: expected one Concatenate layer (got {len(concats)})")
    sources = [_source_inputs(t) for t in concats[0]._inbound_nodes[0].keras_inputs]
    if sources != expected:
        raise ValueError(f"{tower.name}: concatenation order {sources} does not match "
                         f"spec.user_input_features {[f.name for f in features]}")


def _source_inputs(tensor) -> set[str]:
    """Names of the model inputs a Keras tensor is computed from."""
    layer, node_index, _ = tensor._keras_history
    if type(layer).__name__ == "InputLayer":
        return {layer.name}
    node = layer._inbound_nodes[node_index]
    return set().union(*(_source_inputs(t) for t in node.keras_inputs))
