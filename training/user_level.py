"""User-level training (TrainConfig ``examples = "users"``): one example per user, as
Mult-VAE / Mult-DAE train (Liang et al. 2018).

An example holds the user tower's inputs — the user's features and, as the history, their
training items (most recent first, at most the feature's ``max_length``) — and TARGETS, the
rows in the catalogue of every item they interacted with in training (int32, padded with
-1). The loss is the multinomial log-likelihood of those items under a softmax over the
whole catalogue::

    loss = mean over users of  − Σ_{j ∈ targets(u)} log softmax_j(user_emb_u · item_embᵀ / T)

so each user counts once however many events they have, and every item competes with every
other (no sampling, no logQ). With the history as the only user input and input dropout
(TowerConfig ``history_dropout``), the user tower is a denoising autoencoder's encoder and
the item tower its decoder. Context features have no value for a user as a whole and are
refused.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from contracts.dataset import Dataset
from contracts.feature_spec import FeatureSpec
from contracts.inputs import PAD, item_inputs, pad_sequences
from training.tf_env import tf, tfrs

TARGETS = "_targets"  # per-user example: the catalogue rows of their training items
# optional, float32 like TARGETS' shape: each target's weight in the loss (default 1), for
# soft targets such as a teacher's scores (benchmarks.quality's EASE distillation)
TARGET_WEIGHTS = "_target_weights"


def check_user_level_spec(spec: FeatureSpec) -> None:
    """A user as a whole has no context: refuse context features, naming them."""
    context = [f.name for f in spec.tower("context")]
    if context:
        raise ValueError(f"examples 'users' trains one example per user, which has no event "
                         f"context; remove the context features {context} from the spec or "
                         "train with examples 'events'")
    other = [f.name for f in spec.tower("user")
             if f.kind not in ("categorical", "numeric", "bag", "history")]
    if other:  # e.g. a sequence's item ages are per event
        raise ValueError(f"examples 'users' builds categorical, numeric, bag and history "
                         f"user features only (got {other}); train with examples 'events'")


def user_examples(dataset: Dataset, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One example per user with interactions among ``rows`` (default: every interaction)
    of ``dataset``, users in ascending id order: user features from the users table, each
    history feature the user's items most recent first (timestamp, then row), TARGETS."""
    spec, inter = dataset.spec, dataset.interactions
    cols = spec.columns
    rows = np.arange(len(inter[cols.user_id])) if rows is None else np.asarray(rows)
    users = np.asarray(inter[cols.user_id])[rows].astype(str)
    items = np.asarray(inter[cols.item_id])[rows].astype(str)
    order = np.lexsort((-rows, -np.asarray(inter[cols.timestamp])[rows], users))
    user_ids, starts = np.unique(users[order], return_index=True)
    lists = np.split(items[order], starts[1:])  # per user, most recent first
    return user_level_examples(spec, dataset, user_ids, lists)


def user_level_examples(spec: FeatureSpec, dataset: Dataset, user_ids: np.ndarray,
                        histories: list, targets: list | None = None) -> dict[str, np.ndarray]:
    """Examples for ``user_ids`` [n]: ``histories[i]`` (item ids, most recent first) feeds
    every history feature, ``targets[i]`` (default: the same items) are TARGETS; the
    other user features come from ``dataset.users``."""
    check_user_level_spec(spec)
    cols = spec.columns
    out: dict[str, np.ndarray] = {}
    position = {str(u): i for i, u in enumerate(np.asarray(dataset.users[cols.user_id])
                                                 .astype(str).tolist())}
    found = np.array([position.get(str(u), -1) for u in user_ids], np.int64)
    for f in spec.tower("user"):
        if f.kind == "history":
            out[f.name] = pad_sequences([h[:f.max_length] for h in histories], f.max_length)
        elif f.name == cols.user_id:
            out[f.name] = np.asarray(user_ids, dtype=str).astype(object)
        else:
            out[f.name] = _user_column(f, dataset.users.get(f.name), found)
    catalogue = np.asarray(dataset.items[cols.item_id]).astype(str)
    out[TARGETS] = target_rows(catalogue, histories if targets is None else targets)
    return out


def _user_column(f, values, found: np.ndarray) -> np.ndarray:
    """A user feature's value per user row (``found`` -1: an unknown user, missing)."""
    if f.kind == "numeric":
        column = np.full(len(found), np.nan, np.float32)
        if values is not None:
            column[found >= 0] = np.asarray(values, np.float32)[found[found >= 0]]
        return column
    if f.kind == "bag":
        bags = [tuple(values[r]) if values is not None and r >= 0 else () for r in found]
        return pad_sequences(bags, f.max_length)
    column = np.full(len(found), PAD, dtype=object)
    if values is not None:
        column[found >= 0] = np.asarray(values, dtype=object)[found[found >= 0]]
    return column


def target_rows(catalogue: np.ndarray, targets: list) -> np.ndarray:
    """int32 [n, max targets]: each user's target items as catalogue rows, -1 padded; an
    item not in the catalogue is dropped (it has no embedding to score)."""
    order = np.argsort(catalogue)
    width = max((len(t) for t in targets), default=0)
    out = np.full((len(targets), max(width, 1)), -1, np.int32)
    for i, items in enumerate(targets):
        items = np.asarray(items, dtype=str)
        pos = np.searchsorted(catalogue[order], items).clip(0, max(len(order) - 1, 0))
        known = catalogue[order][pos] == items if len(order) else np.zeros(len(items), bool)
        rows = np.unique(order[pos[known]])  # a repeated item is one target
        out[i, :len(rows)] = rows
    return out


class UserLevelModel(tfrs.Model):
    """The multinomial log-likelihood above over the towers' scores (user_emb · item_emb / T;
    cosines when the towers normalise). ``corpus``: item-tower inputs of every catalogue
    item, in the row order TARGETS refers to."""

    def __init__(self, user_tower, item_tower, corpus: Mapping[str, np.ndarray],
                 temperature: float) -> None:
        super().__init__()
        self.user_tower, self.item_tower = user_tower, item_tower
        self.user_keys = tuple(user_tower.input.keys())
        self.item_keys = tuple(item_tower.input.keys())
        self.temperature = temperature
        self._corpus = {k: tf.constant(corpus[k]) for k in self.item_keys}

    def compute_loss(self, features, training: bool = False):
        user_emb = self.user_tower({k: features[k] for k in self.user_keys}, training=training)
        # through a gather, as training.model does for the full corpus (faster to train)
        rows = tf.range(tf.shape(next(iter(self._corpus.values())))[0])
        item_emb = self.item_tower({k: tf.gather(v, rows) for k, v in self._corpus.items()},
                                   training=training)
        logits = tf.matmul(user_emb, item_emb, transpose_b=True) / self.temperature
        log_p = tf.nn.log_softmax(logits, axis=-1)
        targets = tf.cast(features[TARGETS], tf.int32)
        picked = tf.gather(log_p, tf.maximum(targets, 0), batch_dims=1)
        if TARGET_WEIGHTS in features:
            picked = picked * features[TARGET_WEIGHTS]
        per_user = -tf.reduce_sum(tf.where(targets >= 0, picked, 0.0), axis=1)
        return tf.reduce_mean(per_user)


def compiled_user_level_model(spec: FeatureSpec, stats, config, learning_rate,
                              items: Mapping[str, np.ndarray]) -> UserLevelModel:
    """Built and compiled in the training strategy's scope, as training.train's model
    (``config`` a TrainConfig; ``learning_rate`` a float or a Keras schedule)."""
    from training.distributed import training_strategy
    from training.model import Towers
    from training.optimizers import make_optimizer

    with training_strategy().scope():
        towers = Towers(spec, stats, config.tower)
        model = UserLevelModel(towers.user_tower(), towers.item_tower(),
                               item_inputs(spec, items), config.loss.temperature)
        model.compile(optimizer=make_optimizer(config.optimizer, learning_rate, model))
    return model


def stats_examples(spec: FeatureSpec, examples: Mapping[str, np.ndarray],
                   items: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What training.model.compute_feature_stats reads: the user features of the per-user
    examples and, for the item tower, the catalogue's columns (its vocabularies and numeric
    moments are then the catalogue's, not weighted by interactions)."""
    out = {f.name: examples[f.name] for f in spec.tower("user")}
    out.update({f.name: item_inputs(spec, items)[f.name] for f in spec.tower("item")})
    return out



def prepared_user_examples(manifest, spec: FeatureSpec, item_ids: np.ndarray,
                           every: bool) -> dict[str, np.ndarray]:
    """Per-user examples from prepared shards (contracts.prepared), for ``every`` event or
    the train split only. The hold-out rows already hold what a user-level example needs: a
    valid row (users with 3+ events) has the user's features, their history before it
    (every train item, most recent first, up to the cap) and SEEN_ITEMS (the train items,
    the latest ``max_seen``); so has the test row of a user with 2 events (one seen item).
    With ``every``, each test row plus its own item is the user's whole record. A user with
    a single event has no hold-out row and no example (one item: nothing to reconstruct)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from contracts.prepared import SEEN_ITEMS

    check_user_level_spec(spec)
    features = spec.tower("user")
    columns = list(dict.fromkeys([f.name for f in features] + [spec.columns.item_id,
                                                               SEEN_ITEMS]))

    def read(split: str) -> pa.Table:
        tables = [pq.read_table(s.path, columns=columns) for s in manifest.splits[split].shards]
        return pa.concat_tables(tables) if tables else None

    test = read("test")
    if test is None or not len(test):
        raise ValueError(f"{manifest.path}: no test rows, so no user with 2 or more events: "
                         "user-level training needs users with an item to reconstruct")
    seen_count = pc.list_value_length(test.column(SEEN_ITEMS)).to_numpy(
        zero_copy_only=False)
    if every:
        return _examples_of(test, spec, features, item_ids, with_own_item=True)
    parts = [t for t in (read("valid"), test.filter(pa.array(seen_count == 1))) if t is not None]
    return _examples_of(pa.concat_tables(parts), spec, features, item_ids, with_own_item=False)


def _examples_of(table, spec: FeatureSpec, features, item_ids: np.ndarray,
                 with_own_item: bool) -> dict[str, np.ndarray]:
    from contracts.prepared import SEEN_ITEMS
    from training.shards import arrow_inputs

    out = arrow_inputs(table, spec, features)
    targets = [list(s or ()) for s in table.column(SEEN_ITEMS).to_pylist()]
    if with_own_item:
        own = np.asarray(table.column(spec.columns.item_id).to_pylist(), dtype=object)
        for f in features:
            if f.kind == "history":  # the event's item is the most recent of the record
                out[f.name] = np.concatenate([own[:, None], out[f.name][:, :-1]], axis=1)
        targets = [t + [i] for t, i in zip(targets, own.tolist(), strict=True)]
    out[TARGETS] = target_rows(np.asarray(item_ids).astype(str), targets)
    return out
