"""rows_by_id gives the dict a comprehension gives, a chunk at a time."""

import numpy as np
import pytest

from retrieval import row_lookup
from retrieval.row_lookup import rows_by_id

IDS = ["i10", "i2", "", "é-日本", "i2-long-suffix", "x" * 40, "i2"]  # "i2" twice


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(row_lookup, "CHUNK", 3)  # several chunks even for a few ids


@pytest.mark.parametrize("make", [list, np.array], ids=["list", "array"])
def test_the_dict_is_the_comprehension_and_a_repeated_id_keeps_its_last_row(make):
    assert rows_by_id(make(IDS)) == {item: row for row, item in enumerate(IDS)}
    assert rows_by_id(make(IDS))["i2"] == 6


def test_given_rows_go_with_their_ids():
    rows = np.array([40, 41, 42, 43, 44, 45, 46])
    assert rows_by_id(np.array(IDS), rows) == dict(zip(IDS, rows.tolist()))
    assert all(type(r) is int for r in rows_by_id(np.array(IDS), rows).values())
    assert rows_by_id(IDS, range(1, 8)) == dict(zip(IDS, range(1, 8)))


def test_empty_and_mismatched_input():
    assert rows_by_id([]) == {}
    with pytest.raises(ValueError, match="2 ids but 1 rows"):
        rows_by_id(["a", "b"], [1])


def test_a_table_is_emptied_a_chunk_at_a_time():
    table = rows_by_id([f"i{n}" for n in range(10)])
    row_lookup.empty_politely(table)
    assert table == {}
