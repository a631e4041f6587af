"""The sequence feature's encoder: self-attention over the user's last items.

A ``kind = "sequence"`` feature (contracts.feature_spec) takes the user's last L item ids,
most recent first ("" padded), and each one's age bucket (contracts.inputs.gap_buckets,
0 = padding or unknown time). ``SequenceEncoder`` maps them to one [d] vector:

    x_j = item_emb[id_j] + position[j] + age[bucket_j]          (zero where id_j is "")
    block (× blocks, post-norm):  x = LN(x + MHA(x));  x = LN(x + W2·relu(W1·x))
    out = x_0 (the most recent item, having attended to the whole sequence); zeros when
          the sequence is empty

The item embeddings are the item tower's table (as a history's are); d is its width. The
attention is written out by hand (no keras.layers.MultiHeadAttention), so that
retrieval.sequence_tower computes exactly this in NumPy from the weights in ``weights()``
order, to 1e-5. Keys at padded positions are masked out; dropout (training only) acts on
the inputs and each residual branch.
"""

from __future__ import annotations

import numpy as np

from training.tf_env import keras, tf

LN_EPSILON = 1e-6
MASKED = -1e9  # added to the attention logit of a padded key
FFN_MULTIPLE = 2  # the feed-forward layer's width, in multiples of d
# per block, in the order the layer creates them (and numpy_export writes them)
BLOCK_WEIGHTS = ("wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "ln1_gamma", "ln1_beta",
                 "w1", "b1", "w2", "b2", "ln2_gamma", "ln2_beta")


class SequenceEncoder(keras.layers.Layer):
    """(item_emb [n, L, d] float32, ids [n, L] str, gaps [n, L] int32) → [n, d] float32."""

    def __init__(self, max_length: int, width: int, blocks: int, heads: int,
                 time_buckets: int, dropout: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if width % heads:
            raise ValueError(f"heads ({heads}) must divide the width ({width})")
        self.max_length, self.width, self.blocks, self.heads = max_length, width, blocks, heads
        self.time_buckets, self.dropout = time_buckets, dropout
        normal = keras.initializers.TruncatedNormal(stddev=0.02)
        self.position = self.add_weight(name="position", shape=(max_length, width),
                                        initializer=normal)
        self.age = self.add_weight(name="age", shape=(time_buckets + 1, width),
                                   initializer=normal)
        self.block_weights = [self._block(b) for b in range(blocks)]

    def _block(self, b: int) -> dict:
        d, f = self.width, self.width * FFN_MULTIPLE
        shapes = {"wq": (d, d), "bq": (d,), "wk": (d, d), "bk": (d,), "wv": (d, d), "bv": (d,),
                  "wo": (d, d), "bo": (d,), "ln1_gamma": (d,), "ln1_beta": (d,),
                  "w1": (d, f), "b1": (f,), "w2": (f, d), "b2": (d,), "ln2_gamma": (d,),
                  "ln2_beta": (d,)}
        out = {}
        for name in BLOCK_WEIGHTS:
            init = ("ones" if name.endswith("gamma") else
                    "zeros" if name.startswith(("b", "ln")) else "glorot_uniform")
            out[name] = self.add_weight(name=f"block{b}_{name}", shape=shapes[name],
                                        initializer=init)
        return out

    def get_config(self) -> dict:
        return {**super().get_config(), "max_length": self.max_length, "width": self.width,
                "blocks": self.blocks, "heads": self.heads, "time_buckets": self.time_buckets,
                "dropout": self.dropout}

    def weights_in_order(self) -> list[np.ndarray]:
        """position, age, then each block's BLOCK_WEIGHTS: float32 arrays."""
        out = [self.position, self.age]
        out += [w[name] for w in self.block_weights for name in BLOCK_WEIGHTS]
        return [np.asarray(v.numpy(), np.float32) for v in out]

    def call(self, item_emb, ids, gaps, training=None):
        present = tf.cast(tf.not_equal(ids, ""), tf.float32)            # [n, L]
        x = item_emb + self.position[tf.newaxis] + tf.gather(self.age, gaps)
        x = self._drop(x * present[..., tf.newaxis], training)
        bias = (1.0 - present)[:, tf.newaxis, tf.newaxis, :] * MASKED  # [n, 1, 1, L]
        for w in self.block_weights:
            x = _layer_norm(x + self._drop(self._attend(x, bias, w), training),
                            w["ln1_gamma"], w["ln1_beta"])
            ffn = tf.nn.relu(x @ w["w1"] + w["b1"]) @ w["w2"] + w["b2"]
            x = _layer_norm(x + self._drop(ffn, training), w["ln2_gamma"], w["ln2_beta"])
        return x[:, 0, :] * present[:, :1]

    def _attend(self, x, bias, w):
        q, k, v = (self._heads(x @ w[f"w{c}"] + w[f"b{c}"]) for c in "qkv")  # [n, h, L, dh]
        logits = tf.matmul(q, k, transpose_b=True) / np.sqrt(self.width // self.heads) + bias
        out = tf.matmul(tf.nn.softmax(logits, axis=-1), v)                   # [n, h, L, dh]
        out = tf.reshape(tf.transpose(out, [0, 2, 1, 3]), [-1, self.max_length, self.width])
        return out @ w["wo"] + w["bo"]

    def _heads(self, x):
        x = tf.reshape(x, [-1, self.max_length, self.heads, self.width // self.heads])
        return tf.transpose(x, [0, 2, 1, 3])

    def _drop(self, x, training):
        if training and self.dropout > 0.0:
            return tf.nn.dropout(x, rate=self.dropout)
        return x


def _layer_norm(x, gamma, beta):
    mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
    return (x - mean) * tf.math.rsqrt(var + LN_EPSILON) * gamma + beta
