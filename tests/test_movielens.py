"""MovieLens raw files become the canonical dataset and a feature spec that parses."""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path

import numpy as np
import pytest

from contracts.dataset import load_dataset, write_dataset
from contracts.errors import DataError
from contracts.feature_spec import parse_feature_spec
from training.movielens import ML100K_GENRES, convert_ml1m, convert_ml100k, main_convert

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _write(path: Path, lines: list[str]) -> None:
    path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))


def _flags(*genres: str) -> str:
    return "|".join("1" if g in genres else "0" for g in ML100K_GENRES)


@pytest.fixture
def ml100k(tmp_path: Path) -> Path:
    src = tmp_path / "ml-100k"
    src.mkdir()
    _write(src / "u.user", [
        "1|24|M|technician|85711",
        "2|53|F|other|94043",
        "3|23|M|writer|T8H1N",  # a Canadian postcode: no leading digit
    ])
    _write(src / "u.item", [
        "1|Toy Story (1995)|01-Jan-1995||http://x/1|" + _flags("Animation", "Children's", "Comedy"),
        "2|Café Society (1993)|4-Feb-1993||http://x/2|" + _flags("Drama", "Romance"),
        "3|unknown||||" + _flags("unknown"),
        "4|Déjà Vu (1997)|sometime||http://x/4|" + _flags(),  # nobody rated it yet
    ])
    _write(src / "u.data", [
        "1\t1\t5\t881250949",
        "1\t2\t3\t881251000",
        "2\t2\t1\t891717742",
        "3\t3\t4\t878887116",
    ])
    return src


@pytest.fixture
def ml1m(tmp_path: Path) -> Path:
    src = tmp_path / "ml-1m"
    src.mkdir()
    _write(src / "users.dat", ["1::F::1::10::48067", "2::M::56::16::V5A2B"])
    _write(src / "movies.dat", [
        "10::GoldenEye (1995)::Action|Adventure|Thriller",
        "20::Associate, The (L'Associé)(1982)::Comedy",
        "30::Untitled::Drama",
    ])
    _write(src / "ratings.dat", ["1::10::5::978300760", "2::20::2::978302109",
                                 "2::10::4::978301968"])
    _write(src / "ratings_no_timestamps.csv", ["user_id,item_dense_id,rating",
                                               "1,1,5", "2,3,2", "2,1,4"])
    return src


def test_ml100k_every_rating_is_an_interaction_with_string_ids_and_int64_seconds(ml100k):
    dataset, _ = convert_ml100k(ml100k)
    got = dataset.interactions
    assert set(got) == {"user_id", "item_id", "timestamp"}  # the rating is dropped
    assert got["user_id"].dtype == object and got["user_id"].tolist() == ["1", "1", "2", "3"]
    assert got["item_id"].tolist() == ["1", "2", "2", "3"]
    assert got["timestamp"].dtype == np.int64
    assert got["timestamp"].tolist() == [881250949, 881251000, 891717742, 878887116]


def test_ml100k_min_rating_drops_lower_ratings(ml100k):
    dataset, _ = convert_ml100k(ml100k, min_rating=3)
    assert dataset.interactions["item_id"].tolist() == ["1", "2", "3"]
    assert dataset.interactions["user_id"].tolist() == ["1", "1", "3"]


def test_ml100k_users_have_numeric_age_and_categorical_demographics(ml100k):
    users = convert_ml100k(ml100k)[0].users
    assert users["user_id"].tolist() == ["1", "2", "3"]
    assert users["age"].dtype == np.float32 and users["age"].tolist() == [24.0, 53.0, 23.0]
    assert users["gender"].tolist() == ["M", "F", "M"]
    assert users["occupation"].tolist() == ["technician", "other", "writer"]
    assert users["zip_prefix"].tolist() == ["8", "9", "?"]
    assert all(type(v) is str for v in users["gender"])


def test_ml100k_items_have_genre_bags_and_release_years(ml100k):
    items = convert_ml100k(ml100k)[0].items
    assert items["item_id"].tolist() == ["1", "2", "3", "4"]  # the whole catalogue
    assert items["genres"].tolist() == [
        ("Animation", "Children's", "Comedy"), ("Drama", "Romance"), ("unknown",), (),
    ]
    assert items["year"].tolist() == ["1995", "1993", "unknown", "unknown"]


def test_ml100k_genre_names_come_from_u_genre_when_present(ml100k):
    names = [g.upper() for g in ML100K_GENRES]
    _write(ml100k / "u.genre", [f"{n}|{i}" for i, n in enumerate(names)] + [""])
    items = convert_ml100k(ml100k)[0].items
    assert items["genres"][1] == ("DRAMA", "ROMANCE")


def test_ml100k_spec_parses_and_puts_each_feature_in_its_tower(ml100k):
    _, spec_toml = convert_ml100k(ml100k)
    spec = parse_feature_spec(tomllib.loads(spec_toml))
    kinds = {f.name: (f.tower, f.kind) for f in spec.features}
    assert kinds == {
        "user_id": ("user", "categorical"), "age": ("user", "numeric"),
        "gender": ("user", "categorical"), "occupation": ("user", "categorical"),
        "zip_prefix": ("user", "categorical"), "hour_of_day": ("context", "categorical"),
        "day_of_week": ("context", "categorical"), "recent_items": ("user", "history"),
        "item_id": ("item", "categorical"), "genres": ("item", "bag"),
        "year": ("item", "categorical"),
    }
    assert spec.feature("user_id").embedding_dim == spec.feature("item_id").embedding_dim == 32
    assert spec.feature("hour_of_day").derive == "hour_of_day"
    assert spec.feature("day_of_week").dtype == "int"
    assert spec.feature("recent_items").max_length == 20


def test_ml1m_tables_join_users_and_movies(ml1m):
    dataset, spec_toml = convert_ml1m(ml1m)
    assert dataset.interactions["user_id"].tolist() == ["1", "2", "2"]
    assert dataset.interactions["item_id"].tolist() == ["10", "20", "10"]
    assert dataset.interactions["timestamp"].tolist() == [978300760, 978302109, 978301968]
    users = dataset.users
    assert users["gender"].tolist() == ["F", "M"]
    assert users["age"].tolist() == ["1", "56"]  # a bucket code, so categorical
    assert users["occupation"].tolist() == ["10", "16"]
    assert users["zip_prefix"].tolist() == ["4", "?"]
    items = dataset.items
    assert items["genres"].tolist() == [("Action", "Adventure", "Thriller"), ("Comedy",),
                                        ("Drama",)]
    assert items["year"].tolist() == ["1995", "1982", "unknown"]
    spec = parse_feature_spec(tomllib.loads(spec_toml))
    assert spec.feature("age").kind == "categorical"
    assert spec.feature("hour_of_day").tower == "context"


def test_ml1m_without_timestamps_keeps_only_item_ids_and_warns(ml1m, caplog):
    with caplog.at_level(logging.WARNING, logger="training.movielens"):
        dataset, spec_toml = convert_ml1m(ml1m, "ratings_no_timestamps.csv")
    assert "no timestamps" in caplog.text
    assert dataset.interactions["item_id"].tolist() == ["1", "3", "1"]
    assert dataset.interactions["timestamp"].dtype == np.int64
    assert dataset.interactions["timestamp"].tolist() == [0, 0, 0]
    assert dataset.items == {"item_id": dataset.items["item_id"]}
    assert dataset.items["item_id"].tolist() == ["1", "3"]
    assert len(dataset.users["user_id"]) == 2
    names = {f.name for f in parse_feature_spec(tomllib.loads(spec_toml)).features}
    assert names == {"user_id", "gender", "age", "occupation", "zip_prefix", "item_id"}


def _convert(kind: str, src: Path):
    if kind == "ml-100k":
        return convert_ml100k(src)
    if kind == "ml-1m":
        return convert_ml1m(src)
    return convert_ml1m(src, "ratings_no_timestamps.csv")


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
@pytest.mark.parametrize("kind", ["ml-100k", "ml-1m", "ml-1m-no-timestamps"])
def test_written_dataset_loads_back_identical(kind, fmt, ml100k, ml1m, tmp_path):
    dataset, spec_toml = _convert(kind, ml100k if kind == "ml-100k" else ml1m)
    loaded = load_dataset(write_dataset(dataset, tmp_path / "out", spec_toml, fmt))
    assert loaded.spec == dataset.spec
    for table in ("interactions", "users", "items"):
        got, want = getattr(loaded, table), getattr(dataset, table)
        assert set(got) == set(want), table
        for column in want:
            assert got[column].dtype == want[column].dtype, (table, column)
            assert got[column].tolist() == want[column].tolist(), (table, column)


def test_main_convert_writes_a_loadable_dataset_and_logs_counts(ml100k, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="training.movielens"):
        out = main_convert("ml-100k", str(ml100k), str(tmp_path / "out"), fmt="csv")
    assert (out / "interactions.csv").exists()
    assert load_dataset(out).num_interactions == 4
    assert "3 users, 4 items, 4 interactions" in caplog.text


def test_main_convert_names_the_kinds_it_knows(ml100k, tmp_path):
    with pytest.raises(ValueError, match="'ml-100k' or 'ml-1m'.*got 'ml-20m'"):
        main_convert("ml-20m", str(ml100k), str(tmp_path / "out"))


@pytest.mark.parametrize("name, lines, line, words", [
    ("u.data", ["1\t1\t5\t881250949", "", "1\t2\t3"], 3, "expected 4 fields"),
    ("u.data", ["1\t1\t5\t881250949", "x\t2\t3\t881251000"], 2, "user id must be an integer"),
    ("u.data", ["1\t1\t5\t881250949", "9\t2\t3\t881251000"], 2, "user id 9"),
    ("u.data", ["1\t1\t5\tyesterday"], 1, "timestamp must be an integer"),
    ("u.user", ["1|24|M|technician|85711", "1|30|F|writer|10001"], 2, "appears twice"),
    ("u.item", ["1|Toy Story (1995)|01-Jan-1995||http://x/1|" + _flags()[:-2]], 1,
     "expected 24 fields"),
])
def test_ml100k_malformed_line_names_file_and_line(ml100k, name, lines, line, words):
    _write(ml100k / name, lines)
    with pytest.raises(DataError, match=words) as info:
        convert_ml100k(ml100k)
    assert f"{name}:{line}:" in str(info.value)
    assert info.value.line == line


@pytest.mark.parametrize("name, lines, line, words", [
    ("users.dat", ["1::F::1::10::48067", "2::M::56::16"], 2, "expected 5 fields"),
    ("ratings_no_timestamps.csv", ["user,item,rating", "1,1,5"], 1, "expected header"),
    ("ratings_no_timestamps.csv", ["user_id,item_dense_id,rating", "1,1,five"], 2,
     "rating must be an integer"),
])
def test_ml1m_malformed_line_names_file_and_line(ml1m, name, lines, line, words):
    _write(ml1m / name, lines)
    with pytest.raises(DataError, match=words) as info:
        convert_ml1m(ml1m, "ratings_no_timestamps.csv")
    assert f"{name}:{line}:" in str(info.value)


def test_missing_file_is_named(ml100k):
    (ml100k / "u.user").unlink()
    with pytest.raises(DataError, match=r"u\.user"):
        convert_ml100k(ml100k)


def test_real_ml100k_converts_completely():
    src = SHARED_DATA / "ml-100k"
    if not (src / "u.data").exists():
        pytest.skip(f"MovieLens 100K not found at {src}")
    dataset, _ = convert_ml100k(src)
    assert dataset.num_interactions == 100_000
    assert len(dataset.users["user_id"]) == 943
    assert len(dataset.items["item_id"]) == 1_682
    assert dataset.items["year"][266] == "unknown"  # item 267 has no release date


def test_real_ml1m_without_timestamps_converts_completely():
    src = SHARED_DATA / "ml-1m"
    if not (src / "ratings_no_timestamps.csv").exists():
        pytest.skip(f"MovieLens 1M not found at {src}")
    dataset, _ = convert_ml1m(src, "ratings_no_timestamps.csv")
    assert dataset.num_interactions == 1_000_209
    assert len(dataset.users["user_id"]) == 6_040
    assert len(dataset.items["item_id"]) == 3_706
