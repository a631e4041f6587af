"""tf.data over a prepared split's Parquet shards (contracts.prepared): the model's input
dicts, streamed, in memory bounded by the shuffle buffer, whatever the number of examples.

Without tensorflow-io (unmaintained, no build for TF 2.18+), Parquet reaches tf.data only
through a Python generator: each file is read as Arrow record batches
(``ParquetFile.iter_batches``), and each column leaves Python as Arrow's own buffers — a
string column as one bytes blob and its offsets, a list column with its list offsets too —
never as Python strings. A parallel ``map`` turns them into the tensors contracts.inputs
builds (categorical → string [n], numeric → float32 [n] with NaN, bag/history → string
[n, max_length] padded with "", truncated as ``pad_sequences`` does), so the towers of
training.model take them unchanged. Then: rows shuffled in a bounded buffer, batched, the
logQ column (``CANDIDATE_Q``) looked up from the manifest's item counts, prefetched.

Files are interleaved (several read at once) and shuffled per pass, each pass with its own
seed (``config.seed`` and the pass's number), so the stream is one fixed sequence and a
resumed run (``start_row``) rebuilds it from the pass it stopped in: whole passes are never
read again, only the rows already consumed of that pass are read and skipped. Under TF_CONFIG each
worker reads a disjoint set of files (``worker_shards``: file i goes to worker i mod W,
never tf.data's auto-sharding), and the stream repeats: with a fixed number of steps per
epoch (``steps_per_epoch``), a worker with fewer rows cannot leave the others waiting in
the last step's all-reduce.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from contracts.errors import ArtifactError
from contracts.feature_spec import Feature, FeatureSpec
from contracts.prepared import PreparedManifest, Shard
from training.distributed import WorkerRole
from training.model import CANDIDATE_Q
from training.tf_env import tf

READ_ROWS = 4096           # rows per Arrow record batch (one generator step)
SHUFFLE_BUFFER = 65_536    # rows; about 50 MB at the demo spec's row size
CYCLE_LENGTH = 4           # files read at once
PASS_GRAPH_SEED = 17       # the graph seed of one pass's tf.data function (see one_pass)


@dataclass(frozen=True)
class StreamConfig:
    """``shuffle_buffer``: rows held for shuffling (0 = keep file order, for tests);
    ``repeat``: an endless stream (training, with fixed steps) or one pass; ``start_row``:
    rows of this stream already consumed (a resumed run: global step × this pipeline's
    batch), skipped."""

    batch_size: int
    seed: int = 0
    shuffle_buffer: int = SHUFFLE_BUFFER
    repeat: bool = True
    read_rows: int = READ_ROWS
    cycle_length: int = CYCLE_LENGTH
    start_row: int = 0


def split_shards(manifest: PreparedManifest, splits: Sequence[str]) -> tuple[Shard, ...]:
    """The shards of ``splits`` (names, or one name), in manifest order."""
    splits = (splits,) if isinstance(splits, str) else splits
    return tuple(shard for split in splits for shard in manifest.splits[split].shards)


def worker_shards(shards: Sequence[Shard], role: WorkerRole) -> tuple[Shard, ...]:
    """The shards worker ``role.index`` of ``role.num_workers`` reads: every W-th one,
    disjoint across workers and together all of them."""
    if len(shards) < role.num_workers:
        raise ArtifactError(str(shards[0].path.parent) if shards else "prepared split",
                            f"{len(shards)} shards for {role.num_workers} workers; every worker "
                            f"needs one: prepare again with a shard count that is a multiple "
                            f"of the worker count")
    return tuple(shards[role.index::role.num_workers])


def steps_per_epoch(rows: int, batch_size: int) -> int:
    """Global steps in one epoch of ``rows`` examples (as the in-memory path: whole
    batches only; at least one)."""
    return max(1, rows // batch_size)


def stream_examples(manifest: PreparedManifest, splits: Sequence[str], config: StreamConfig,
                    role: WorkerRole = WorkerRole(1, 0),
                    item_q: tf.lookup.StaticHashTable | None = None) -> tf.data.Dataset:
    """Batches of model inputs {feature: tensor} from this worker's shards of ``splits``
    (e.g. ("train",); hold-out splits' extra columns are not read).

    ``config.batch_size`` is this pipeline's batch (per replica under a strategy). With
    ``item_q`` (``candidate_q_table``) each batch also carries ``CANDIDATE_Q`` [b] float32.
    """
    spec = manifest.spec
    shards = worker_shards(split_shards(manifest, splits), role)
    check_columns(shards[0], spec)
    paths = tf.constant([str(s.path) for s in shards])
    signature = _signature(spec)
    columns = tuple(f.name for f in spec.features)

    def read(path):
        return tf.data.Dataset.from_generator(
            _record_batches, args=(path, columns, _kinds(spec), config.read_rows),
            output_signature=signature)

    def one_pass(number):
        # tf.data checks (graph seed, op seed) == (0, 0) in Python, which fails for a tensor
        # op seed when the graph seed is 0 (keras.utils.set_random_seed(0)): this function's
        # graph gets a fixed seed of its own, so the pass seed alone decides the order
        tf.random.set_seed(PASS_GRAPH_SEED)
        seed = pass_seed(config.seed, number)
        files = tf.data.Dataset.from_tensor_slices(paths)
        if config.shuffle_buffer:
            files = files.shuffle(len(shards), seed=seed, reshuffle_each_iteration=False)
        rows = files.interleave(read, cycle_length=min(config.cycle_length, len(shards)),
                                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        rows = rows.map(lambda raw: _decode(raw, spec), num_parallel_calls=tf.data.AUTOTUNE)
        rows = rows.unbatch()
        if config.shuffle_buffer:
            rows = rows.shuffle(config.shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
        return rows

    first, skipped = divmod(config.start_row, max(1, sum(s.rows for s in shards)))
    passes = tf.data.Dataset.counter(first)
    data = passes.flat_map(one_pass) if config.repeat else passes.take(1).flat_map(one_pass)
    if skipped:
        data = data.skip(skipped)
    data = data.batch(config.batch_size, drop_remainder=config.repeat)
    if item_q is not None:
        item_id = spec.columns.item_id
        data = data.map(lambda b: {**b, CANDIDATE_Q: item_q.lookup(b[item_id])},
                        num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    # Files are assigned to workers above; tf.data's AUTO would fall back to DATA sharding
    # (every worker reading every file) when it cannot shard by file.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return data.with_options(options).prefetch(tf.data.AUTOTUNE)


def pass_seed(seed: int, number) -> tf.Tensor:
    """The shuffle seed of pass ``number`` (int64 tensor) of a stream seeded ``seed``."""
    return tf.constant(seed, tf.int64) * 1_000_003 + tf.cast(number, tf.int64)


def candidate_q_table(item_ids: np.ndarray, counts: np.ndarray) -> tf.lookup.StaticHashTable:
    """item id → share of the training examples whose positive it is (float32), as
    training.sampling.exact_item_frequencies gives in memory; item_ids [n], counts [n]."""
    total = max(float(np.sum(counts)), 1.0)
    q = (np.asarray(counts, np.float64) / total).astype(np.float32)
    init = tf.lookup.KeyValueTensorInitializer(
        tf.constant(np.asarray(item_ids, dtype=object).astype(str)), tf.constant(q))
    # an item without a train count (a hold-out row's, with --no-eval) counts once: q = 0
    # would be clipped to 1e-6 and give its logit a large bonus
    return tf.lookup.StaticHashTable(init, default_value=np.float32(1.0 / total))


def check_columns(shard: Shard, spec: FeatureSpec) -> None:
    """Refuse a shard without a column the spec needs, naming the file (a missing column
    would otherwise surface as a generator error deep inside TensorFlow)."""
    try:
        names = set(pq.read_schema(shard.path).names)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ArtifactError(str(shard.path), f"cannot read the shard: {exc}") from exc
    missing = [f.name for f in spec.features if f.name not in names]
    if missing:
        raise ArtifactError(str(shard.path), f"missing columns {missing} of the feature spec; "
                            f"prepare again with this spec")


def arrow_inputs(table: pa.Table | pa.RecordBatch, spec: FeatureSpec,
                 features: Sequence[Feature] | None = None) -> dict[str, np.ndarray]:
    """NumPy model inputs of Arrow rows, as contracts.inputs builds them (for evaluation,
    where a sample of rows is picked in NumPy rather than streamed through tf.data)."""
    return {f.name: _numpy_column(_array(table.column(f.name)), f)
            for f in (spec.features if features is None else features)}


def _array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _kinds(spec: FeatureSpec) -> tuple[str, ...]:
    return tuple(_wire(f) for f in spec.features)


def _wire(f: Feature) -> str:
    """How a feature's column travels: string | numeric | list."""
    if f.kind == "numeric":
        return "numeric"
    return "list" if f.is_sequence else "string"


def _signature(spec: FeatureSpec) -> dict:
    blob, offsets = tf.TensorSpec([], tf.string), tf.TensorSpec([None], tf.int64)
    out = {}
    for f in spec.features:
        kind = _wire(f)
        if kind == "numeric":
            out[f.name] = tf.TensorSpec([None], tf.float32)
        elif kind == "string":
            out[f.name] = (blob, offsets)
        else:
            out[f.name] = (blob, offsets, offsets)
    return out


def _record_batches(path: bytes, columns, kinds, read_rows: int):
    """One file's record batches as Arrow buffers (see the module docstring)."""
    names = [c.decode() if isinstance(c, bytes) else c for c in columns]
    kinds = [k.decode() if isinstance(k, bytes) else k for k in kinds]
    with pq.ParquetFile(path.decode()) as reader:
        for batch in reader.iter_batches(batch_size=int(read_rows), columns=names):
            yield {name: _buffers(batch.column(name), kind)
                   for name, kind in zip(names, kinds, strict=True)}


def _buffers(column: pa.Array, kind: str):
    if kind == "numeric":
        return _floats(column)
    if kind == "string":
        return _string_buffers(column)
    column = column.cast(pa.list_(pa.string())) if column.type != pa.list_(pa.string()) else column
    list_offsets = column.offsets.to_numpy().astype(np.int64)
    blob, offsets = _string_buffers(column.flatten())
    return blob, offsets, list_offsets - list_offsets[0]


def _string_buffers(column: pa.Array) -> tuple[bytes, np.ndarray]:
    """A string array as (its characters as one bytes blob, int64 offsets [n + 1] into it);
    a null is an empty string ("" = missing, as contracts.inputs)."""
    if column.type != pa.string():
        column = column.cast(pa.string())
    _, offsets_buffer, data = column.buffers()
    offsets = np.frombuffer(offsets_buffer, np.int32)[column.offset:column.offset + len(column) + 1]
    offsets = offsets.astype(np.int64)
    start, end = (int(offsets[0]), int(offsets[-1])) if len(offsets) else (0, 0)
    blob = data.slice(start, end - start).to_pybytes() if data is not None else b""
    return blob, offsets - start


def _floats(column: pa.Array) -> np.ndarray:
    return pc.fill_null(column.cast(pa.float32()), np.float32("nan")).to_numpy(
        zero_copy_only=False).astype(np.float32, copy=False)


def _strings(blob, offsets):
    return tf.strings.substr(blob, offsets[:-1], offsets[1:] - offsets[:-1])


def _decode(raw: dict, spec: FeatureSpec) -> dict:
    """Arrow buffers of one record batch → the towers' input tensors."""
    out = {}
    for f in spec.features:
        kind = _wire(f)
        if kind == "numeric":
            out[f.name] = raw[f.name]
        elif kind == "string":
            out[f.name] = _strings(*raw[f.name])
        else:
            blob, offsets, list_offsets = raw[f.name]
            ragged = tf.RaggedTensor.from_row_splits(_strings(blob, offsets), list_offsets,
                                                     validate=False)
            out[f.name] = ragged.to_tensor(default_value="", shape=[None, f.max_length])
    return out


def _numpy_column(column: pa.Array, f: Feature) -> np.ndarray:
    kind = _wire(f)
    if kind == "numeric":
        return _floats(column)
    if kind == "string":
        return np.asarray(pc.fill_null(column.cast(pa.string()), "").to_pylist(), dtype=object)
    out = np.full((len(column), f.max_length), "", dtype=object)
    for i, row in enumerate(column.to_pylist()):
        row = (row or [])[: f.max_length]
        out[i, : len(row)] = row
    return out
