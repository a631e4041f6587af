"""The sampled softmax the model trains with, against a plain NumPy computation."""

from __future__ import annotations

import numpy as np
import pytest

from contracts.feature_spec import parse_feature_spec
from training.model import CANDIDATE_Q, FeatureStats, LossConfig, Towers, TowerConfig, TwoTowerModel
from training.tf_env import tf

SPEC = parse_feature_spec({"features": {
    "user_id": {"tower": "user", "kind": "categorical", "embedding_dim": 4},
    "item_id": {"tower": "item", "kind": "categorical", "embedding_dim": 4},
}})
ITEMS = ["a", "b", "c", "d", "e"]


def _model(loss: LossConfig, corpus_probs=None):
    tf.keras.utils.set_random_seed(0)
    stats = FeatureStats({"user_id": ("u1", "u2", "u3"), "item_id": tuple(ITEMS)}, {}, {})
    towers = Towers(SPEC, stats, TowerConfig(embedding_dim=4, hidden_dims=(), output_layer=False))
    corpus = {"item_id": np.array(ITEMS, dtype=object)} if corpus_probs is not None else None
    return TwoTowerModel(towers.user_tower(), towers.item_tower(), "item_id", loss,
                         batch_size=3, corpus=corpus, corpus_probs=corpus_probs)


def _batch():
    return {"user_id": tf.constant(["u1", "u2", "u3"]), "item_id": tf.constant(["a", "b", "a"]),
            CANDIDATE_Q: tf.constant([0.5, 0.25, 0.5])}


def _numpy_loss(u, c, positives_on_diagonal, q, temperature, cand_ids, pos_ids, remove_hits):
    logits = u @ c.T / temperature
    if q is not None:
        logits = logits - np.log(q)[None, :]
    n = len(u)
    if remove_hits:
        for i in range(n):
            for j in range(len(cand_ids)):
                if j != i and cand_ids[j] == pos_ids[i]:
                    logits[i, j] = -1e9
    logits -= logits.max(axis=1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -log_softmax[np.arange(n), np.arange(n)].sum()


def _embeddings(model, batch):
    u = model.user_tower({"user_id": batch["user_id"]}).numpy()
    c = model.item_tower({"item_id": batch["item_id"]}).numpy()
    return u, c


@pytest.mark.parametrize("loss", [
    LossConfig(logq="none", remove_accidental_hits=False),
    LossConfig(logq="exact", remove_accidental_hits=False),
    LossConfig(logq="exact", remove_accidental_hits=True),
    LossConfig(logq="exact", remove_accidental_hits=True, temperature=0.2),
])
def test_in_batch_loss_matches_numpy(loss):
    model, batch = _model(loss), _batch()
    u, c = _embeddings(model, batch)
    q = None if loss.logq == "none" else batch[CANDIDATE_Q].numpy() * 3  # expected count per batch
    expected = _numpy_loss(u, c, True, q, loss.temperature, ["a", "b", "a"], ["a", "b", "a"],
                           loss.remove_accidental_hits)
    np.testing.assert_allclose(float(model.compute_loss(batch)), expected, rtol=1e-5)


def test_accidental_hit_removal_changes_the_loss_only_when_a_positive_repeats():
    batch = _batch()
    with_dupes = [float(_model(LossConfig(remove_accidental_hits=r)).compute_loss(batch))
                  for r in (False, True)]
    assert with_dupes[0] != pytest.approx(with_dupes[1])
    unique = {**batch, "item_id": tf.constant(["a", "b", "c"])}
    without = [float(_model(LossConfig(remove_accidental_hits=r)).compute_loss(unique))
               for r in (False, True)]
    assert without[0] == pytest.approx(without[1])


def test_mixed_negatives_add_corpus_candidates_with_their_own_correction():
    probs = np.array([0.4, 0.3, 0.1, 0.1, 0.1])
    loss = LossConfig(logq="exact", corpus_negatives=4, remove_accidental_hits=True)
    model, batch = _model(loss, probs), _batch()
    tf.random.set_seed(7)
    got = float(model.compute_loss(batch))
    tf.random.set_seed(7)  # the same corpus draw, replayed
    rows = tf.random.categorical(np.log(probs)[None, :].astype(np.float32), 4)[0].numpy()
    u, c = _embeddings(model, batch)
    neg = model.item_tower({"item_id": tf.constant(np.array(ITEMS)[rows])}).numpy()
    q = np.concatenate([batch[CANDIDATE_Q].numpy() * 3, probs[rows] * 4])
    cand_ids = ["a", "b", "a"] + [ITEMS[r] for r in rows]
    expected = _numpy_loss(u, np.vstack([c, neg]), True, q, loss.temperature, cand_ids,
                           ["a", "b", "a"], True)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_hard_negatives_keep_only_the_top_scoring_negatives():
    base = float(_model(LossConfig(logq="none", remove_accidental_hits=False)).compute_loss(_batch()))
    hard = float(_model(LossConfig(logq="none", remove_accidental_hits=False,
                                   hard_negatives=1)).compute_loss(_batch()))
    assert hard < base  # fewer negatives in each softmax: a smaller loss


def test_bad_loss_settings_are_refused():
    with pytest.raises(ValueError, match="logq must be one of none, exact, streaming"):
        LossConfig(logq="approx")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        LossConfig(temperature=0)
    with pytest.raises(ValueError, match="corpus negatives need the corpus"):
        _model(LossConfig(corpus_negatives=2))


def test_full_corpus_adds_every_item_once_with_q_one():
    loss = LossConfig(logq="exact", corpus_distribution="full", remove_accidental_hits=True,
                      temperature=0.5)
    model, batch = _model(loss, corpus_probs=np.full(len(ITEMS), 1 / len(ITEMS))), _batch()
    u, c = _embeddings(model, batch)
    every = model.item_tower({"item_id": tf.constant(ITEMS)}).numpy()
    q = np.concatenate([batch[CANDIDATE_Q].numpy() * 3, np.ones(len(ITEMS))])
    expected = _numpy_loss(u, np.vstack([c, every]), True, q, 0.5, ["a", "b", "a"] + ITEMS,
                           ["a", "b", "a"], True)
    np.testing.assert_allclose(float(model.compute_loss(batch)), expected, rtol=1e-5)
    assert float(model.compute_loss(batch)) == float(model.compute_loss(batch))  # no draw


HISTORY_SPEC = parse_feature_spec({"features": {
    "user_id": {"tower": "user", "kind": "categorical", "embedding_dim": 4},
    "history": {"tower": "user", "kind": "history", "max_length": 4},
    "item_id": {"tower": "item", "kind": "categorical", "embedding_dim": 4},
}})


def _history_towers(tower: TowerConfig) -> Towers:
    tf.keras.utils.set_random_seed(0)
    stats = FeatureStats({"user_id": ("u1", "u2"), "item_id": tuple(ITEMS)}, {}, {})
    return Towers(HISTORY_SPEC, stats, tower)


def test_history_dropout_drops_items_in_training_only():
    from training.model import MaskedMeanPool

    ids = tf.constant([["a", "b", "c", ""]] * 4000)
    one_hot = tf.constant(np.tile(np.eye(4, dtype=np.float32), (4000, 1, 1)))  # item j → e_j
    pool = MaskedMeanPool(dropout=0.5)
    np.testing.assert_allclose(pool(one_hot, ids, training=False).numpy(),
                               np.tile([1 / 3, 1 / 3, 1 / 3, 0], (4000, 1)), rtol=1e-6)
    dropped = pool(one_hot, ids, training=True).numpy()
    kept = dropped > 0
    assert not kept[:, 3].any()  # padding never counts
    rows = kept.any(axis=1)
    np.testing.assert_allclose(dropped[rows], kept[rows] / kept[rows].sum(1, keepdims=True),
                               rtol=1e-6)  # the mean of the kept items
    assert kept[:, :3].mean() == pytest.approx(0.5, abs=0.02)


def test_history_dropout_leaves_the_serving_tower_unchanged():
    inputs = {"user_id": tf.constant(["u1", "u2"]),
              "history": tf.constant([["a", "b", "c", ""], ["d", "", "", ""]])}
    plain = _history_towers(TowerConfig(embedding_dim=4, hidden_dims=(8,))).user_tower()
    dropping = _history_towers(TowerConfig(embedding_dim=4, hidden_dims=(8,),
                                           history_dropout=0.5)).user_tower()
    dropping.set_weights(plain.get_weights())
    np.testing.assert_allclose(dropping(inputs, training=False), plain(inputs), rtol=1e-6)
    tf.random.set_seed(3)
    assert not np.allclose(dropping(inputs, training=True), plain(inputs))


def test_embedding_l2_adds_its_penalty_to_the_loss():
    towers = _history_towers(TowerConfig(embedding_dim=4, hidden_dims=(), embedding_l2=0.01))
    user, item = towers.user_tower(), towers.item_tower()
    model = TwoTowerModel(user, item, "item_id", LossConfig(logq="none"), batch_size=2)
    tables = {w.name: w.numpy() for w in model.trainable_weights if "embedding" in w.name}
    expected = 0.01 * sum(float((t ** 2).sum()) for t in tables.values())
    assert len(tables) == 2  # user id, item id (shared by the history)
    np.testing.assert_allclose(float(tf.add_n(model.losses)), expected, rtol=1e-5)


def test_bad_tower_and_corpus_settings_are_refused():
    with pytest.raises(ValueError, match=r"history_dropout must be in \[0, 1\)"):
        TowerConfig(history_dropout=1.0)
    with pytest.raises(ValueError, match="embedding_l2 must be >= 0"):
        TowerConfig(embedding_l2=-1e-3)
    with pytest.raises(ValueError, match="corpus_distribution must be one of"):
        LossConfig(corpus_distribution="zipf")
    with pytest.raises(ValueError, match="leave corpus_negatives at 0"):
        LossConfig(corpus_distribution="full", corpus_negatives=10)
