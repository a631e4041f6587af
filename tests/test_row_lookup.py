"""IdRows answers as the dict {id: row} would, for a whole batch of ids at once."""

import numpy as np
import pytest

from retrieval import row_lookup
from retrieval.row_lookup import MISSING, IdRows

@pytest.fixture(params=["dict", "hashed"], autouse=True)
def table_kind(request, monkeypatch):
    """Every spec holds for both forms: a small table is a dict, a large one hashed."""
    if request.param == "hashed":
        monkeypatch.setattr(row_lookup, "SMALL", 0)
    return request.param


IDS = ["i10", "i2", "é-日本", "i2-long-suffix", "x" * 40, "i2"]  # "i2" twice


def as_dict(ids, rows=None):
    return dict(zip(ids, range(len(ids)) if rows is None else rows))


@pytest.mark.parametrize("make", [list, np.array, lambda v: np.array(v, dtype=object)],
                         ids=["list", "unicode-array", "object-array"])
def test_rows_are_the_dicts_and_a_repeated_id_keeps_its_last_row(make):
    table = IdRows(make(IDS))
    expected = as_dict(IDS)
    assert table.rows(list(expected)).tolist() == list(expected.values())
    assert table.get("i2") == 5 and len(table) == len(expected)  # distinct ids


def test_given_rows_go_with_their_ids():
    rows = np.array([40, 41, 42, 43, 44, 45])
    table = IdRows(np.array(IDS), rows)
    assert table.rows(IDS[:5]).tolist() == [40, 45, 42, 43, 44]  # "i2": its last row


def test_unknown_ids_are_missing_even_when_a_prefix_or_an_extension_is_held():
    table = IdRows(["item-1", "item-12", "b"])
    queries = ["item-123", "item-", "item-1", "a", "", "c" * 100, "item-12" + "x" * 50]
    assert table.rows(queries).tolist() == [MISSING, MISSING, 0, MISSING, MISSING, MISSING,
                                            MISSING]
    assert table.get("nope") is None and table.get("nope", -7) == -7


def test_the_result_has_the_shape_of_the_query():
    table = IdRows(["a", "b", "c"])
    grid = np.array([["a", "z"], ["c", "b"]], dtype=object)
    assert table.rows(grid).tolist() == [[0, MISSING], [2, 1]]


def test_empty_tables_and_queries_and_mismatched_input():
    assert IdRows([]).rows(["a", "b"]).tolist() == [MISSING, MISSING]
    assert IdRows(["a"]).rows([]).tolist() == []
    with pytest.raises(ValueError, match="2 ids but 1 rows"):
        IdRows(["a", "b"], [1])


def test_a_million_ids_build_and_answer_as_a_dict_would():
    rng = np.random.default_rng(0)
    ids = np.array([f"item-{n}" for n in rng.permutation(1_000_000)])
    table = IdRows(ids)
    probe = rng.integers(0, 1_000_000, 2_000)
    queries = [str(ids[i]) for i in probe] + [f"item-{n}" for n in range(1_000_000, 1_000_500)]
    assert table.rows(queries).tolist() == probe.tolist() + [MISSING] * 500


def test_ids_whose_hashes_collide_are_still_told_apart(monkeypatch):
    weak = lambda ids: np.zeros(len(ids), dtype=np.uint64)  # noqa: E731 - every id collides
    monkeypatch.setattr(row_lookup, "_hash", weak)
    ids = [f"id{n}" for n in range(50)]
    table = IdRows(ids)
    assert table.rows(ids[::-1] + ["id50"]).tolist() == list(range(49, -1, -1)) + [MISSING]


def test_a_cached_table_is_mapped_by_the_next_process_and_answers_the_same(tmp_path):
    """IdRows.cached: the first build is kept under its key and mapped from there; the next
    one (another worker) maps those arrays instead of building; a damaged entry is built
    again."""
    ids = np.array([f"item-{n}" for n in range(20_000)])
    first = IdRows.cached("index-abc", lambda: (ids, None), tmp_path)
    again = IdRows.cached("index-abc", lambda: (ids, None), tmp_path)
    assert isinstance(again._ids.base, np.memmap) and isinstance(first._ids.base, np.memmap)
    queries = ["item-7", "item-19999", "nope", "item-123"]
    assert again.rows(queries).tolist() == first.rows(queries).tolist() == [7, 19999, MISSING,
                                                                            123]
    (tmp_path / "index-abc" / "starts.npy").unlink()
    rebuilt = IdRows.cached("index-abc", lambda: (ids, None), tmp_path)
    assert rebuilt.rows(queries).tolist() == [7, 19999, MISSING, 123]
    remapped = IdRows.cached("index-abc", lambda: (ids, None), tmp_path)
    assert isinstance(remapped._ids.base, np.memmap)


def test_the_cache_keeps_only_its_newest_entries(tmp_path):
    """A nightly publish adds entries; the cache keeps the KEEP newest of a kind."""
    import os

    from retrieval import mapped_cache

    ids = np.array([f"item-{n}" for n in range(10_000)])
    for n in range(mapped_cache.KEEP + 3):
        IdRows.cached(f"index-v{n}", lambda: (ids, None), tmp_path)
        os.utime(tmp_path / f"index-v{n}", (n, n))  # written in this order
        mapped_cache.prune(tmp_path)
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == sorted(f"index-v{n}" for n in range(3, mapped_cache.KEEP + 3))


def test_two_processes_writing_one_array_both_map_the_first_ones_file(tmp_path, monkeypatch):
    """mapped_cache.mapped_array: the first writer's file stays (a link, not a rename), so
    concurrent loaders of one pair end up sharing one copy."""
    from retrieval import mapped_cache

    monkeypatch.setenv("TWO_TOWER_CACHE_DIR", str(tmp_path))
    first = mapped_cache.mapped_array("tower-k-table", lambda: np.arange(10.0))
    path = tmp_path / "arrays" / "tower-k-table.npy"
    inode = path.stat().st_ino
    # a second writer that made its array before it saw the first's (a race)
    monkeypatch.setattr(type(path), "is_file", lambda self: False)
    second = mapped_cache.mapped_array("tower-k-table", lambda: np.arange(10.0) * 0 + 7)
    assert path.stat().st_ino == inode and second.tolist() == first.tolist() == list(
        np.arange(10.0))
    assert not list((tmp_path / "arrays").glob(".*tmp"))


def test_small_lookups_asked_again_answer_the_same_past_the_recent_ids_bound(monkeypatch):
    """A serving batch's few ids go through a bounded dict of recent lookups first: asked
    again (and after that dict was emptied for being full) they get the same rows, unknown
    ids stay missing, and a large query answers the same as many small ones."""
    monkeypatch.setattr(row_lookup, "RECENT_IDS", 7)
    monkeypatch.setattr(row_lookup, "RECENT_QUERY", 64)
    ids = [f"item-{n}" for n in range(40)]
    table = IdRows(np.array(ids))
    expected = [table.rows([i]).tolist()[0] for i in ids]
    assert expected == list(range(40))
    for _ in range(3):
        for start in range(0, 40, 3):
            query = ids[start : start + 3] + ["item-40"]
            assert table.rows(np.array(query, dtype=object)).tolist() == (
                expected[start : start + 3] + [MISSING])
    big = ids * 3  # more than RECENT_QUERY ids: the hashed path alone
    assert len(big) > row_lookup.RECENT_QUERY
    assert table.rows(big).tolist() == expected * 3
