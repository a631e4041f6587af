"""The served towers of a model with a linear part (training.linear_part): the trained
towers' outputs with the linear part's vectors appended, as Keras models, so the
SavedModels, the item embeddings and the index hold the whole model.

The linear part's tables are constants in the item-id lookup's row space: the rows of
catalogue items hold their vectors, the OOV rows zeros, so a history's padding ("") and
an item the model never saw add nothing.
"""

from __future__ import annotations

import numpy as np

from contracts.feature_spec import FeatureSpec
from training.linear_part import LinearPart
from training.tf_env import keras, tf

USER_PART = "linear_user_part"  # the served user tower's LinearTable layer


class LinearTable(keras.layers.Layer):
    """rows [n] → a constant table's rows [n, r]; ``summed``: rows [n, L] → their sum [n, r]."""

    def __init__(self, table: np.ndarray, summed: bool, **kwargs) -> None:
        super().__init__(trainable=False, **kwargs)
        self.summed = summed
        self.table = self.add_weight(name="table", shape=table.shape, trainable=False,
                                     initializer=keras.initializers.Constant(table))

    def call(self, rows):
        gathered = tf.gather(self.table, rows)
        return tf.reduce_sum(gathered, axis=1) if self.summed else gathered


def linear_history_feature(spec: FeatureSpec) -> str:
    """The user tower's one history feature, which the linear part reads."""
    names = [f.name for f in spec.tower("user") if f.kind == "history"]
    if len(names) != 1:
        raise ValueError(f"a linear part reads the user tower's history feature; the spec "
                         f"has {len(names)} ({names}): give it exactly one")
    return names[0]


def served_towers(user_tower, item_tower, spec: FeatureSpec, catalogue_ids: np.ndarray,
                  part: LinearPart):
    """(user, item) Keras models: each trained tower's output with the linear part after it."""
    history = linear_history_feature(spec)
    lookup = user_tower.get_layer(f"{spec.columns.item_id}_lookup")
    rows = lookup(tf.constant(np.asarray(catalogue_ids).astype(str))).numpy()

    def in_lookup_rows(table: np.ndarray) -> np.ndarray:
        """[n_items, r] in catalogue order → [lookup rows, r], zeros at the OOV rows."""
        out = np.zeros((int(lookup.vocabulary_size()), table.shape[1]), np.float32)
        out[rows] = table
        return out

    user_sum = LinearTable(in_lookup_rows(part.user_table), summed=True, name=USER_PART)
    item_vec = LinearTable(in_lookup_rows(part.item_table), summed=False,
                           name="linear_item_part")
    user_in = {name: keras.Input(shape=t.shape[1:], dtype=t.dtype, name=name)
               for name, t in user_tower.input.items()}
    user_out = keras.layers.Concatenate(name="user_with_linear")(
        [user_tower(user_in), user_sum(lookup(user_in[history]))])
    item_in = {name: keras.Input(shape=t.shape[1:], dtype=t.dtype, name=name)
               for name, t in item_tower.input.items()}
    item_out = keras.layers.Concatenate(name="item_with_linear")(
        [item_tower(item_in), item_vec(lookup(item_in[spec.columns.item_id]))])
    return (keras.Model(user_in, user_out, name="user_tower_served"),
            keras.Model(item_in, item_out, name="item_tower_served"))
