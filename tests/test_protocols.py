"""Evaluation protocols: RecBole's per-user 8:1:1 split and 10-core filter, the temporal
leave-one-out, and the popularity baseline under each (toy cases, then the real data)."""

from __future__ import annotations

import time
import tomllib
from pathlib import Path

import numpy as np
import pytest

from contracts.dataset import Dataset
from contracts.errors import DataError
from contracts.feature_spec import parse_feature_spec
from training.protocols import (k_core, ml100k_temporal_leave_one_out, popularity_ranking,
                                ratio_split_sizes, recbole_general, recbole_ml1m_general)

TOL = 1e-12
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize("n, sizes", [
    (10, [8, 1, 1]),  # int(.1*10)=1 twice; train 10-2=8
    (11, [9, 1, 1]),  # int(1.1)=1 twice; train 11-2=9
    (19, [17, 1, 1]),  # int(1.9)=1 twice
    (20, [16, 2, 2]),  # int(2.0)=2 twice
    (3, [1, 1, 1]),   # floor gives 3/0/0; .3 in (0,1): test +1 → 2/0/1; again valid → 1/1/1
    (2, [1, 0, 1]),   # 2/0/0; .2 in (0,1): test +1 → 1/0/1; train is 1, so the loop stops
    (1, [1, 0, 0]),   # 1/0/0; train is already 1: nothing moves
    (0, [0, 0, 0]),
])
def test_ratio_split_sizes_follow_recbole(n, sizes):
    np.testing.assert_array_equal(ratio_split_sizes(np.array([n])), [sizes])


def test_k_core_repeats_until_stable():
    # k = 2.  rows: 0 A-x  1 A-y  2 B-x  3 B-y  4 C-y  5 C-z  6 D-x
    # round 1: user D has 1, item z has 1 → drop rows 6 and 5
    # round 2: user C is left with row 4 only → drop it; x and y keep 2 each
    # round 3: nothing changes
    users = np.array(["A", "A", "B", "B", "C", "C", "D"])
    items = np.array(["x", "y", "x", "y", "y", "z", "x"])
    one_round = [(users == u).sum() >= 2 and (items == i).sum() >= 2
                 for u, i in zip(users, items, strict=True)]
    assert one_round == [1, 1, 1, 1, 1, 0, 0]  # a single pass would wrongly keep C-y
    np.testing.assert_array_equal(k_core(users, items, 2), [1, 1, 1, 1, 0, 0, 0])


def test_recbole_general_filters_then_splits_each_user_8_1_1():
    # user 1: 12 ratings >= 3 (and 2 below, dropped); user 2: 10; user 3: 3
    users = np.repeat([1, 1, 2, 3], [12, 2, 10, 3])
    items = np.r_[np.arange(12), [20, 21], np.arange(10), [0, 1, 2]]
    ratings = np.r_[np.full(12, 4), [1, 2], np.full(10, 3), [5, 5, 5]]
    split = recbole_general(users, items, ratings, seed=0, min_count=1)
    assert len(split.users) == 25 and split.n_users == 3 and split.n_items == 12
    sizes = [[np.sum(split.users[part] == u) for part in (split.train, split.valid, split.test)]
             for u in range(3)]
    assert sizes == [[10, 1, 1], [8, 1, 1], [1, 1, 1]]  # int(1.2)=1; 10: 8/1/1; 3: 1/1/1
    everything = np.sort(np.concatenate([split.train, split.valid, split.test]))
    np.testing.assert_array_equal(everything, np.arange(25))
    same = recbole_general(users, items, ratings, seed=0, min_count=1)
    np.testing.assert_array_equal(same.test, split.test)
    other = [recbole_general(users, items, ratings, seed=s, min_count=1).test for s in range(5)]
    assert any(not np.array_equal(t, split.test) for t in other)  # the shuffle is seeded


def test_recbole_ml1m_refuses_a_file_with_other_counts(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text("user_id,item_dense_id,rating\n1,1,5\n1,2,4\n")
    with pytest.raises(DataError, match="834449"):
        recbole_ml1m_general(path, seed=0)


def _tiny_temporal() -> Dataset:
    spec = parse_feature_spec(tomllib.loads(
        '[columns]\nuser_id = "user_id"\nitem_id = "item_id"\ntimestamp = "timestamp"\n'
        '[features.user_id]\ntower = "user"\nkind = "categorical"\n'
        '[features.item_id]\ntower = "item"\nkind = "categorical"\n'), "<test spec>")
    #          row:  0    1    2    3    4    5    6    7    8
    user = np.array(["1", "2", "1", "1", "2", "3", "2", "4", "4"], dtype=object)
    item = np.array(["a", "a", "b", "c", "b", "c", "d", "d", "a"], dtype=object)
    time_ = np.array([1, 7, 5, 5, 7, 2, 3, 9, 9], dtype=np.int64)
    items = {"item_id": np.array(["a", "b", "c", "d", "e"], dtype=object)}
    return Dataset(spec, {"user_id": user, "item_id": item, "timestamp": time_},
                   {"user_id": np.array(["1", "2", "3", "4"], dtype=object)}, items)


def test_temporal_leave_one_out_breaks_time_ties_by_row():
    split = ml100k_temporal_leave_one_out(_tiny_temporal())
    # user 1: rows 0 (t1), 2 (t5), 3 (t5)  → train 0, valid 2, test 3 (tie: later row)
    # user 2: rows 6 (t3), 1 (t7), 4 (t7)  → train 6, valid 1, test 4
    # user 3: row 5 only                   → train
    # user 4: rows 7 (t9), 8 (t9)          → train 7, test 8 (two events: no valid)
    np.testing.assert_array_equal(split.train, [0, 5, 6, 7])
    np.testing.assert_array_equal(split.valid, [1, 2])
    np.testing.assert_array_equal(split.test, [3, 4, 8])
    np.testing.assert_array_equal(split.items, [0, 0, 1, 2, 1, 2, 3, 3, 0])  # items-table rows
    assert split.n_items == 5  # item e was never interacted with and is still ranked


def test_popularity_ranking_under_the_temporal_protocol_by_hand():
    split = ml100k_temporal_leave_one_out(_tiny_temporal())
    # train counts: a 1 (row 0), c 1 (row 5), d 2 (rows 6, 7) → order d, a, c, b, e
    # test, train+valid masked:  user 1 (c): a, b masked → d, c, e    → c at rank 2
    #                            user 2 (b): d, a masked → c, b, e    → b at rank 2
    #                            user 4 (a): d masked    → a, c, b, e → a at rank 1
    test = popularity_ranking(split, "test", ks=(1, 2))
    assert test.n_users == 3
    assert test.recall == pytest.approx({1: 1 / 3, 2: 1.0}, abs=TOL)
    # NDCG@2 = (1/log2(3) + 1/log2(3) + 1) / 3 = (0.630930 * 2 + 1) / 3 = 0.753953
    assert test.ndcg[2] == pytest.approx((2 / np.log2(3) + 1) / 3, abs=TOL)
    assert test.mrr[2] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3, abs=TOL)
    # valid, train masked: user 1 (b): a masked → d, c, b, e → rank 3
    #                      user 2 (a): d masked → a, c, b, e → rank 1
    valid = popularity_ranking(split, "valid", ks=(1, 3))
    assert valid.recall == pytest.approx({1: 1 / 2, 3: 1.0}, abs=TOL)
    assert valid.mrr[3] == pytest.approx((1 / 3 + 1) / 2, abs=TOL)


@pytest.mark.skipif(not (DATA / "ml-1m" / "ratings_no_timestamps.csv").exists(),
                    reason=f"MovieLens ml-1m not found under {DATA}")
def test_recbole_ml1m_counts_and_popularity_near_the_published_table():
    start = time.perf_counter()
    split = recbole_ml1m_general(DATA / "ml-1m" / "ratings_no_timestamps.csv", seed=2020)
    assert (len(split.users), split.n_users, split.n_items) == (834_449, 6_033, 3_123)
    assert (len(split.train), len(split.valid), len(split.test)) == (673_059, 80_695, 80_695)
    pop = popularity_ranking(split, "test", ks=(10,))
    print(f"\nml-1m RecBole split (seed 2020) Pop test: Recall@10 {pop.recall[10]:.4f} "
          f"NDCG@10 {pop.ndcg[10]:.4f} over {pop.n_users} users "
          f"({time.perf_counter() - start:.1f} s)")
    # Published Pop: 0.0699 / 0.1006. Another shuffle moves these by hundredths, and
    # RecBole's Pop counts an item at most once per training batch, which lowers it.
    assert pop.n_users == 6_033
    assert abs(pop.recall[10] - 0.0699) < 0.02
    assert abs(pop.ndcg[10] - 0.1006) < 0.03


@pytest.mark.skipif(not (DATA / "ml-100k" / "u.data").exists(),
                    reason=f"MovieLens ml-100k not found under {DATA}")
def test_ml100k_temporal_protocol_on_the_real_data():
    from training.movielens import convert_ml100k

    dataset, _ = convert_ml100k(DATA / "ml-100k")
    split = ml100k_temporal_leave_one_out(dataset)
    assert (split.n_users, split.n_items) == (943, 1_682)
    assert (len(split.valid), len(split.test), len(split.train)) == (943, 943, 100_000 - 2 * 943)
    time_ = dataset.interactions["timestamp"]
    last_train = np.full(943, -1)
    np.maximum.at(last_train, split.users[split.train], time_[split.train])
    assert (time_[split.test] >= last_train[split.users[split.test]]).all()
    pop = popularity_ranking(split, "test", ks=(10,))
    print(f"\nml-100k temporal leave-one-out Pop test: Recall@10 {pop.recall[10]:.4f} "
          f"NDCG@10 {pop.ndcg[10]:.4f} over {pop.n_users} users")
    assert 0.0 < pop.recall[10] < 0.5
