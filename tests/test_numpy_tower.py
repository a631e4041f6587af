"""The NumPy user tower equals the exported SavedModel to 1e-5 (training.numpy_export →
retrieval.numpy_tower), on training rows and on every kind of unknown input."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from tests.tower_parity import Exported, assert_towers_agree, training_inputs

from contracts.errors import ArtifactError
from contracts.inputs import PAD, UserRequest, user_inputs

pytestmark = pytest.mark.slow

TINY = dict(num_users=80, num_items=60, num_clusters=4, interactions_per_user=6)
VARIANTS = {  # name: (normalize, hidden_dims, oov_buckets by feature)
    "plain": (False, (64,), {}),
    "normalized": (True, (64,), {}),
    "oov-hashed": (False, (16, 8), {"user_id": 3, "item_id": 2}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory) -> Exported:
    from retrieval.numpy_tower import NumpyUserTower
    from training.saved_model_tower import SavedModelUserTower
    from contracts.model_manifest import load_model_manifest
    from training.artifact import export_model
    from training.model import TowerConfig
    from training.synthetic import SyntheticConfig, generate_synthetic
    from training.train import TrainConfig, train

    normalize, hidden_dims, oov = VARIANTS[request.param]
    dataset, _ = generate_synthetic(SyntheticConfig(**TINY))
    dataset = _with_oov_buckets(dataset, oov)
    tower = TowerConfig(embedding_dim=16, hidden_dims=hidden_dims, normalize=normalize)
    trained = train(dataset, TrainConfig(epochs=1, tower=tower))
    model_dir = export_model(trained, tmp_path_factory.mktemp(request.param), {})
    manifest = load_model_manifest(model_dir)
    return Exported(trained, model_dir, SavedModelUserTower(manifest),
                    NumpyUserTower.load(model_dir))


def _with_oov_buckets(dataset, oov: dict[str, int]):
    spec = dataset.spec
    features = tuple(dataclasses.replace(f, oov_buckets=oov.get(f.name, f.oov_buckets))
                     for f in spec.features)
    return dataclasses.replace(dataset, spec=dataclasses.replace(spec, features=features))


def test_agrees_on_trainingtraining_inputs(exported):
    assert_towers_agree(exported, training_inputs(exported))


def test_agrees_one_row_at_a_time(exported):
    inputs = training_inputs(exported, 5)
    for i in range(5):
        assert_towers_agree(exported, {k: v[i:i + 1] for k, v in inputs.items()})


def test_agrees_on_unknown_users_items_and_context(exported):
    requests = [
        UserRequest(f"stranger-{i}", {}, (), {}, event_time=1_700_000_000 + 3_600 * i)
        for i in range(20)
    ] + [
        UserRequest("u1", {"age": 30.0, "country": "nowhere"}, ("i1", "no-such-item", "i2"),
                    {"device": "toaster"}, event_time=0),
        UserRequest("", {}, ("zzz", "", "i3"), {"hour_of_day": 99}, event_time=0),
        UserRequest("ünïcödé-👤", {"country": ""}, ("ïtem",), {}, event_time=0),
    ]
    assert_towers_agree(exported, user_inputs(exported.spec, requests))


def test_agrees_on_empty_histories(exported):
    inputs = training_inputs(exported, 50)
    history = next(f.name for f in exported.spec.user_input_features if f.kind == "history")
    inputs[history] = np.full_like(inputs[history], PAD)
    assert_towers_agree(exported, inputs)


def test_agrees_on_missing_numeric_values(exported):
    inputs = training_inputs(exported, 50)
    numeric = [f.name for f in exported.spec.user_input_features if f.kind == "numeric"]
    assert numeric
    for name in numeric:
        values = inputs[name].copy()
        values[::2] = np.nan
        values[1::4] = np.inf
        inputs[name] = values
    assert_towers_agree(exported, inputs)


def test_hashed_oov_matches_string_lookup():
    """Unknown ids land in the bucket Keras' StringLookup gives them, for several counts."""
    from retrieval.numpy_tower import _Lookup
    from training.tf_env import keras

    vocabulary = [f"v{i}" for i in range(10)]
    ids = np.array(vocabulary + ["", "x", "ünï", "v10", "V1", " v1", "a" * 100] +
                   [f"unknown-{i}" for i in range(50)], dtype=object).reshape(-1, 1)
    for num_oov in (1, 2, 3, 7):
        layer = keras.layers.StringLookup(vocabulary=vocabulary, num_oov_indices=num_oov)
        np.testing.assert_array_equal(_Lookup(vocabulary, num_oov)(ids), layer(ids).numpy())
        # a serving batch's few ids take the lookup's Python path (FEW_IDS): the same rows
        for one in (ids[i : i + 1] for i in range(len(ids))):
            np.testing.assert_array_equal(_Lookup(vocabulary, num_oov)(one), layer(one).numpy())


def test_a_few_rows_encode_exactly_as_they_do_in_a_large_batch(exported):
    """Batches of 1 to FEW_ROWS rows (pooled features row by row, small vocabularies looked
    up in Python) encode bit for bit as the same rows inside a large batch, with empty,
    partial and unknown histories among them."""
    from retrieval.numpy_tower import FEW_ROWS

    inputs = training_inputs(exported, 40)
    history = next(f.name for f in exported.spec.user_input_features if f.kind == "history")
    inputs[history][1] = PAD  # an empty history
    inputs[history][2, 1:] = PAD  # one item
    inputs[history][3, 0] = "no-such-item"
    tower = exported.numpy_tower
    for encode, names in zip(tower._encoders, tower._takes, strict=True):
        whole = encode(*(inputs[name] for name in names))
        for start in range(0, 8):
            for n in range(1, FEW_ROWS + 2):  # and one row more, the batch path
                few = encode(*(inputs[name][start : start + n] for name in names))
                np.testing.assert_array_equal(few, whole[start : start + n], err_msg=names)
    # the whole tower too, to BLAS's rounding (a 1-row product is a gemv, not a gemm)
    np.testing.assert_allclose(tower({k: v[:1] for k, v in inputs.items()}),
                               tower(inputs)[:1], rtol=0, atol=1e-6)


def test_fingerprint64_is_tensorflows_on_every_length_path():
    """pyfarmhash's Fingerprint64 against tf.strings.to_hash_bucket_fast with ~2^62 buckets:
    lengths 0-3, 4-7, 8-16, 17-32, 33-64 and the 64-byte block loop, ASCII and multi-byte."""
    import random

    from retrieval.numpy_tower import oov_buckets
    from training.tf_env import tf

    rng = random.Random(0)
    alphabet = "abcxyz0189-_éü👤"
    ids = ["".join(rng.choice(alphabet) for _ in range(n)) for n in range(300) for _ in range(3)]
    buckets = 1 << 62
    expected = tf.strings.to_hash_bucket_fast(np.array(ids, dtype=object), buckets).numpy()
    np.testing.assert_array_equal(oov_buckets(ids, buckets), expected)


def test_export_refuses_a_concatenation_order_other_than_the_spec(exported, tmp_path):
    from training.numpy_export import export_numpy_user_tower

    spec = exported.spec
    shuffled = dataclasses.replace(spec, features=tuple(reversed(spec.features)))
    with pytest.raises(ValueError, match="concatenation order"):
        export_numpy_user_tower(exported.trained.user_tower, shuffled, exported.trained.stats,
                                tmp_path)


def test_files_are_arrays_and_a_layer_graph(exported):
    graph = json.loads((exported.model_dir / "user_tower_numpy.json").read_text())
    vocabularies = {f["vocabulary"] for f in graph["features"] if "vocabulary" in f}
    assert graph["format"] == "two-tower-numpy-user-tower/3" and vocabularies
    with np.load(exported.model_dir / "user_tower_numpy.npz", allow_pickle=False) as npz:
        assert all(npz[name].dtype == np.float32 for name in set(npz.files) - vocabularies)
        assert all(npz[name].dtype.kind == "U" and npz[name].ndim == 1
                   for name in vocabularies)
    assert [f["name"] for f in graph["features"]] == [
        f.name for f in exported.spec.user_input_features]
    assert [d["activation"] for d in graph["dense"]][-1] == "linear"
    assert graph["normalize"] == exported.trained.config.tower.normalize


def test_wrong_inputs_are_refused_naming_them(exported):
    inputs = training_inputs(exported, 3)
    del inputs["age"]
    with pytest.raises(ValueError, match=r"missing \['age'\]"):
        exported.numpy_tower(inputs)


def test_altered_or_unlisted_files_are_refused(exported, tmp_path):
    import shutil

    from retrieval.numpy_tower import NumpyUserTower

    copy = tmp_path / "model"
    shutil.copytree(exported.model_dir, copy)
    with open(copy / "user_tower_numpy.npz", "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactError, match="user_tower_numpy.npz: checksum mismatch"):
        NumpyUserTower.load(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["files"]["user_tower_numpy.json"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="lists no user_tower_numpy.json"):
        NumpyUserTower.load(copy)


def test_a_format_1_tower_with_vocabularies_in_its_json_still_loads_and_agrees(
        exported, tmp_path):
    """Artifacts exported before format 2 keep serving: same tower, same outputs."""
    import shutil

    from retrieval.numpy_tower import NumpyUserTower
    from contracts.model_manifest import checksums

    copy = tmp_path / "model"
    shutil.copytree(exported.model_dir, copy)
    graph = json.loads((copy / "user_tower_numpy.json").read_text())
    with np.load(copy / "user_tower_numpy.npz", allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    for feature in graph["features"]:
        if "vocabulary" in feature:
            feature["vocabulary"] = arrays.pop(feature["vocabulary"]).tolist()
    graph["format"] = "two-tower-numpy-user-tower/1"
    (copy / "user_tower_numpy.json").write_text(json.dumps(graph))
    with open(copy / "user_tower_numpy.npz", "wb") as fh:
        np.savez(fh, **arrays)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"] = checksums(copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))

    inputs = training_inputs(exported, 50)
    np.testing.assert_array_equal(NumpyUserTower.load(copy)(inputs),
                                  exported.numpy_tower(inputs))


def test_export_refuses_an_id_a_string_array_cannot_hold():
    from training.numpy_export import _string_array

    assert _string_array(["a", "", "é"], "lookup").tolist() == ["a", "", "é"]
    with pytest.raises(ValueError, match="lookup: an id ends with a NUL"):
        _string_array(["a\x00"], "lookup")


def test_large_arrays_of_the_tower_file_are_memory_mapped_aligned_and_equal(tmp_path,
                                                                         monkeypatch):
    """retrieval.numpy_tower._load_npz: the big table is mapped (the workers of one host
    share its pages), aligned (NumPy copies a whole unaligned array on each take: np.savez
    does not align members, so such a one is copied once into the cache and mapped from
    there); small and compressed members are read."""
    from retrieval import numpy_tower

    monkeypatch.setenv("TWO_TOWER_CACHE_DIR", str(tmp_path / "cache"))
    big = np.random.default_rng(0).standard_normal((5000, 64)).astype(np.float32)  # 1.2 MiB
    small, words = np.arange(6, dtype=np.float32), np.array(["a", "bc", "日本"])
    for pad in ("", "x" * 3):  # a name length that moves the member off alignment
        np.savez(tmp_path / "stored.npz", **{f"big{pad}": big}, small=small, words=words)
        loaded = numpy_tower._load_npz(tmp_path / "stored.npz", cache_key=f"k{len(pad)}")
        table = loaded[f"big{pad}"]
        assert isinstance(table.base, np.memmap) and table.flags.aligned
        assert not table.flags.writeable and np.array_equal(table, big)
        assert not isinstance(loaded["small"].base, np.memmap)
        assert np.array_equal(loaded["small"], small) and loaded["words"].tolist() == ["a", "bc",
                                                                                      "日本"]
    np.savez_compressed(tmp_path / "packed.npz", big=big)
    packed = numpy_tower._load_npz(tmp_path / "packed.npz", cache_key="p")["big"]
    assert not isinstance(packed.base, np.memmap) and np.array_equal(packed, big)


@pytest.mark.parametrize("pooling", ["mean", "normalized_sum", "sum"])
@pytest.mark.parametrize("activation", ["linear", "tanh"])
def test_every_pooling_of_a_few_rows_is_the_batchs_bit_for_bit(pooling, activation):
    """Format 4/5 histories (sum / n, sum / sqrt(n) or the sum; tanh or not), hashed ids:
    1-3 rows pooled row by row give what the same rows give in a batch of 12."""
    from retrieval.numpy_tower import FEW_ROWS, _Embedded

    rng = np.random.default_rng(11)
    entry = {"name": "h", "kind": "history", "max_length": 6, "pooling": pooling,
             "activation": activation, "hash_buckets": 50, "embedding": "h.table"}
    encode = _Embedded(entry, {"h.table": rng.normal(size=(50, 8)).astype(np.float32)})
    ids = np.full((12, 6), PAD, dtype=object)
    for r in range(12):
        n = r % 7  # 0 to 6 ids, the rest padding
        ids[r, :n] = [f"item-{rng.integers(1000)}" for _ in range(n)]
    whole = encode(ids)
    for start in range(9):
        for n in range(1, FEW_ROWS + 1):
            np.testing.assert_array_equal(encode(ids[start : start + n]),
                                          whole[start : start + n])
