"""The canonical input tables and the synthetic generator that feeds the demo and tests."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from contracts.dataset import load_dataset, write_dataset
from contracts.errors import DataError
from contracts.inputs import derive_context, training_examples
from training.synthetic import NIGHT_HOURS, SyntheticConfig, generate_synthetic

SMALL = SyntheticConfig(num_users=50, num_items=60, num_clusters=4, interactions_per_user=8)


@pytest.fixture(scope="module")
def small():
    return generate_synthetic(SMALL)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_dataset_round_trips_through_files(small, tmp_path, fmt):
    dataset, spec_toml = small
    loaded = load_dataset(write_dataset(dataset, tmp_path, spec_toml, fmt))
    for table in ("interactions", "users", "items"):
        for col, values in getattr(dataset, table).items():
            got = getattr(loaded, table)[col]
            assert got.tolist() == values.tolist(), (table, col)


def test_csv_bad_value_names_file_line_and_column(small, tmp_path):
    dataset, spec_toml = small
    write_dataset(dataset, tmp_path, spec_toml, "csv")
    lines = (tmp_path / "users.csv").read_text().splitlines()
    cells = lines[3].split(",")
    cells[1] = "old"  # age
    lines[3] = ",".join(cells)
    (tmp_path / "users.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_dataset(tmp_path)
    assert str(err.value) == (f"{tmp_path / 'users.csv'}:4: column 'age': "
                              "expected a number (got 'old')")


def test_missing_column_is_named(small, tmp_path):
    dataset, spec_toml = small
    write_dataset(dataset, tmp_path, spec_toml, "csv")
    text = (tmp_path / "items.csv").read_text().replace('"tags"', '"labels"', 1)
    (tmp_path / "items.csv").write_text(text)
    with pytest.raises(DataError, match=r"items.csv:1: column 'tags': missing column"):
        load_dataset(tmp_path)


def test_interaction_with_an_item_outside_the_catalogue_is_refused(small, tmp_path):
    dataset, spec_toml = small
    write_dataset(dataset, tmp_path, spec_toml, "csv")
    lines = (tmp_path / "items.csv").read_text().splitlines()
    (tmp_path / "items.csv").write_text("\n".join(l for l in lines if not l.startswith('"i0"')) + "\n")
    with pytest.raises(DataError, match="item 'i0' is not in the items table"):
        load_dataset(tmp_path)


def test_generator_is_seeded(small):
    again, _ = generate_synthetic(SMALL)
    assert again.interactions["item_id"].tolist() == small[0].interactions["item_id"].tolist()
    other, _ = generate_synthetic(SyntheticConfig(**{**SMALL.__dict__, "seed": 1}))
    assert other.interactions["item_id"].tolist() != small[0].interactions["item_id"].tolist()


def test_generator_has_taste_clusters_and_a_night_effect():
    dataset, _ = generate_synthetic(SyntheticConfig(num_users=200, num_items=200, seed=5))
    inter = dataset.interactions
    category = dict(zip(dataset.items["item_id"], dataset.items["category"], strict=True))
    hours = derive_context("hour_of_day", inter["timestamp"]).astype(int)
    night = np.isin(hours, list(NIGHT_HOURS))
    odd = np.array([int(category[i][3:]) % 2 == 1 for i in inter["item_id"]])
    assert odd[night].mean() > 0.6 and odd[~night].mean() < 0.4  # night clusters are odd
    top_share = [collections.Counter(category[i] for i in inter["item_id"][inter["user_id"] == u]
                                     [~night[inter["user_id"] == u]]).most_common(1)[0][1]
                 / max((~night[inter["user_id"] == u]).sum(), 1) for u in ["u1", "u2", "u3"]]
    assert min(top_share) > 0.5  # a user's daytime watching sits in one cluster
    pairs = set(zip(inter["user_id"], inter["item_id"], strict=True))
    assert len(pairs) == len(inter["user_id"])  # nobody watches the same item twice


def test_history_holds_only_earlier_items_most_recent_first(small):
    dataset, _ = small
    examples = training_examples(dataset)
    inter = dataset.interactions
    u0 = np.flatnonzero(inter["user_id"] == "u0")
    order = u0[np.argsort(inter["timestamp"][u0], kind="stable")]
    for position, row in enumerate(order):
        earlier = inter["item_id"][order[:position]][::-1][:10].tolist()
        assert [h for h in examples["recent_items"][row] if h] == earlier


def test_content_vectors_come_on_top_of_the_same_dataset():
    plain, _ = generate_synthetic(SMALL)
    rich, spec_toml = generate_synthetic(SyntheticConfig(**{**SMALL.__dict__, "content_dims": 4}))
    for col, values in plain.interactions.items():
        assert rich.interactions[col].tolist() == values.tolist(), col
    assert rich.items["category"].tolist() == plain.items["category"].tolist()
    assert [f.name for f in rich.spec.tower("item")][-4:] == [f"content{j}" for j in range(4)]
    assert all(f.kind == "numeric" for f in rich.spec.tower("item")[-4:])
    assert "[features.content3]" in spec_toml


def test_content_vectors_cluster_by_category_and_keep_cold_items_apart():
    config = SyntheticConfig(num_users=100, num_items=400, num_clusters=4,
                             interactions_per_user=5, content_dims=8)
    dataset, _ = generate_synthetic(config)
    content = np.stack([dataset.items[f"content{j}"] for j in range(8)], axis=1)
    category = dataset.items["category"]
    means = np.stack([content[category == c].mean(axis=0) for c in np.unique(category)])
    spread_of_means = np.linalg.norm(means - means.mean(axis=0), axis=1).mean()
    assert spread_of_means > 0.5  # categories (mostly clusters) sit in different places
    seen = set(dataset.interactions["item_id"].tolist())
    cold = np.array([i not in seen for i in dataset.items["item_id"]])
    assert cold.sum() > 50
    distinct = {tuple(np.round(row, 3)) for row in content[cold]}
    assert len(distinct) == cold.sum()  # no two untouched items share their features


def test_content_dims_out_of_range_is_refused():
    with pytest.raises(ValueError, match="content_dims"):
        SyntheticConfig(content_dims=-1)
