"""`two-tower load-features --prepared`: users/*.parquet of a prepared output streamed into
a real Redis, read back through RedisFeatureStore as written; bad files refused before
anything is written; memory held by one batch, not by the number of users."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from app.cli import main
from benchmarks.load_features_scale import users_manifest
from retrieval.feature_store import RedisFeatureStore, StoredUser

HISTORY = [f"i{n}" for n in range(25)]  # longer than the store keeps (20)
USERS = [  # user_id, age, country, genres, history: as the preparation job writes them
    ("u0", 31.5, "fr", ["jazz", "rock"], ["i3", "i2", "i1"]),
    ("u1", math.nan, "", [], HISTORY),
    ("u2", None, None, None, []),  # nothing stored: unknown
    ("u3", 18.0, "de", None, None),
    ("ü-4", 70.0, "jp", ["pop"], ["ïtem"]),
    ("u5", 44.0, None, ["a", "b", "c"], ["i9"]),
    ("u6", None, "us", None, ["i1", "i1"]),
]
EXPECTED = {
    "u0": StoredUser({"age": 31.5, "country": "fr", "genres": ("jazz", "rock")},
                     ("i3", "i2", "i1")),
    "u1": StoredUser({"country": "", "genres": ()}, tuple(HISTORY[:20])),
    "u2": None,
    "u3": StoredUser({"age": 18.0, "country": "de"}, ()),
    "ü-4": StoredUser({"age": 70.0, "country": "jp", "genres": ("pop",)}, ("ïtem",)),
    "u5": StoredUser({"age": 44.0, "genres": ("a", "b", "c")}, ("i9",)),
    "u6": StoredUser({"country": "us"}, ("i1", "i1")),
}


def _table(rows) -> pa.Table:
    columns = list(zip(*rows, strict=True))
    return pa.table({
        "user_id": pa.array(columns[0], pa.string()),
        "age": pa.array(columns[1], pa.float32()),
        "country": pa.array(columns[2], pa.string()),
        "genres": pa.array(columns[3], pa.list_(pa.string())),
        "history": pa.array(columns[4], pa.list_(pa.string())),
    })


def write_prepared(root: Path, tables: list[pa.Table], users: dict | None = None) -> Path:
    """users/ in the documented format, split over files, with the manifest's entry."""
    (root / "users").mkdir(parents=True)
    for i, table in enumerate(tables):
        pq.write_table(table, root / "users" / f"users-{i:05d}-of-{len(tables):05d}.parquet",
                       row_group_size=3)
    manifest = users_manifest(sum(t.num_rows for t in tables), history_length=25)
    if users is not None:
        manifest["users"] = users
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def _read_back(url: str, user_ids) -> dict:
    store = RedisFeatureStore.from_url(url, timeout_s=5.0)
    try:
        return dict(zip(user_ids, store.read_users(list(user_ids)), strict=True))
    finally:
        import asyncio

        asyncio.run(store.close())


def _load(prepared: Path, url: str, *extra: str) -> int:
    return main(["load-features", "--prepared", str(prepared), "--redis-url", url, *extra])


def test_users_are_read_back_as_the_files_hold_them(tmp_path, redis_url, capsys):
    prepared = write_prepared(tmp_path / "prepared", [_table(USERS[:4]), _table(USERS[4:])])
    assert _load(prepared, redis_url, "--batch-size", "2") == 0
    assert _read_back(redis_url, EXPECTED) == EXPECTED
    assert re.search(r"wrote features and histories of 7 users from \S+ in [\d.]+ s "
                     r"\(\d+ users/s\)", capsys.readouterr().err)


def test_loading_again_replaces_what_was_stored(tmp_path, redis_url):
    first = write_prepared(tmp_path / "a", [_table(USERS)])
    changed = [("u0", 1.0, None, None, ["i7"])] + USERS[1:]
    second = write_prepared(tmp_path / "b", [_table(changed)])
    assert _load(first, redis_url) == 0 and _load(second, redis_url) == 0
    assert _read_back(redis_url, ["u0"])["u0"] == StoredUser({"age": 1.0}, ("i7",))


def test_a_file_without_the_history_column_is_refused_before_anything_is_written(
        tmp_path, redis_url, capsys):
    broken = _table(USERS[4:]).drop_columns(["history"])
    prepared = write_prepared(tmp_path / "prepared", [_table(USERS[:4]), broken])
    assert _load(prepared, redis_url) == 2
    err = capsys.readouterr().err
    assert "users-00001-of-00002.parquet: column 'history': missing column" in err
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0


def test_a_feature_of_an_unstorable_type_names_its_file_and_column(tmp_path, redis_url,
                                                                   capsys):
    table = _table(USERS).append_column("born", pa.array([b"x"] * len(USERS), pa.binary()))
    prepared = write_prepared(tmp_path / "prepared", [table])
    assert _load(prepared, redis_url) == 2
    assert "column 'born': a user feature must be a string, a number or list<string> " \
           "(got binary)" in capsys.readouterr().err


def test_a_manifest_without_users_or_no_manifest_is_refused(tmp_path, redis_url, capsys):
    prepared = write_prepared(tmp_path / "prepared", [_table(USERS)], users={})
    assert _load(prepared, redis_url) == 2
    assert "manifest.json: malformed manifest: KeyError('path')" in capsys.readouterr().err
    assert _load(tmp_path / "nowhere", redis_url) == 2
    assert "manifest.json: missing: not a prepared directory" in capsys.readouterr().err


def test_data_and_prepared_are_one_or_the_other(tmp_path, redis_url, capsys):
    with pytest.raises(SystemExit):
        main(["load-features", "--data", str(tmp_path), "--prepared", str(tmp_path),
              "--redis-url", redis_url])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.slow
def test_memory_is_held_by_one_batch_not_by_the_number_of_users(tmp_path, redis_url):
    """50,000 users in batches of 1,000, each load in its own process. Streamed, RSS grows
    by Arrow's and the client's fixed buffers only (~15-30 MB here, 47 MB at 1M users);
    held in memory, by 1.5-2.5 KB a user (126 MB here, 1.5 GB at 1M)."""
    from benchmarks.load_features_scale import measure, write_users

    prepared = write_users(tmp_path / "prepared", 50_000, rows_per_file=20_000)

    def load(mode: str) -> dict:
        with redis.Redis.from_url(redis_url) as client:
            client.flushall()
        result = measure(mode, prepared, redis_url, batch_size=1000)
        with redis.Redis.from_url(redis_url) as client:  # each user: a hash and a list
            assert client.dbsize() >= 1.8 * 50_000
        return result

    streamed, in_memory = load("streamed"), load("in-memory")
    assert streamed["users"] == in_memory["users"] == 50_000
    assert in_memory["growth_mb"] > 80, in_memory
    assert streamed["growth_mb"] < min(0.5 * in_memory["growth_mb"], 64), (streamed, in_memory)


def test_an_output_with_no_users_loads_nothing(tmp_path, redis_url, capsys):
    prepared = write_prepared(tmp_path / "prepared", [])
    assert _load(prepared, redis_url) == 0
    assert "wrote features and histories of 0 users" in capsys.readouterr().err
    (prepared / "manifest.json").write_text(
        (prepared / "manifest.json").read_text().replace('"rows": 0, "history', '"rows": 5, '
                                                         '"history'))
    assert _load(prepared, redis_url) == 2
    assert "no .parquet files, but the manifest counts 5 users" in capsys.readouterr().err
