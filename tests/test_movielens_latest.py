"""`convert-movielens --kind ml-latest` (issue 18): a MovieLens "latest"-format release
(ratings.csv, movies.csv with quoted titles, "|"-separated genres and the year in the
title) converts to a dataset that loads; a malformed cell is named with file, line and
column. The files are written here, in the releases' format."""

from __future__ import annotations

import pytest

from app.cli import main
from contracts.dataset import load_dataset

MOVIES = '''movieId,title,genres
1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy
2,"American President, The (1995)",Comedy|Drama|Romance
3,Café Society (2016),(no genres listed)
4,Cosmos,Documentary
'''
RATINGS = '''userId,movieId,rating,timestamp
1,1,4.0,964982703
1,3,4.5,964981247
2,2,0.5,1445714835
2,1,3.0,1445714885
2,4,5.0,1445714900
'''


@pytest.fixture
def release(tmp_path):
    source = tmp_path / "ml-latest-small"
    source.mkdir()
    (source / "movies.csv").write_text(MOVIES, encoding="utf-8")
    (source / "ratings.csv").write_text(RATINGS, encoding="utf-8")
    return source


def test_a_latest_release_converts_to_a_dataset_that_loads(release, tmp_path):
    out = tmp_path / "data"
    assert main(["convert-movielens", "--kind", "ml-latest", "--source", str(release),
                 "--out", str(out), "--format", "csv"]) == 0
    dataset = load_dataset(out)
    items = dict(zip(dataset.items["item_id"], zip(dataset.items["genres"],
                                                   dataset.items["year"], strict=True),
                     strict=True))
    assert items == {"1": (("Adventure", "Animation", "Children", "Comedy", "Fantasy"), "1995"),
                     "2": (("Comedy", "Drama", "Romance"), "1995"),  # a quoted title
                     "3": ((), "2016"),  # no genres listed: an empty bag; UTF-8 title
                     "4": (("Documentary",), "unknown")}
    inter = dataset.interactions
    assert list(inter["user_id"]) == ["1", "1", "2", "2", "2"]
    assert list(inter["item_id"]) == ["1", "3", "2", "1", "4"]
    assert list(inter["timestamp"]) == [964982703, 964981247, 1445714835, 1445714885,
                                        1445714900]
    assert sorted(dataset.users["user_id"]) == ["1", "2"]
    assert {f.name for f in dataset.spec.features} >= {"recent_items", "hour_of_day",
                                                       "genres", "year"}


@pytest.mark.parametrize("name, text, where", [
    ("ratings.csv", RATINGS.replace("4.5", "good"), "ratings.csv:3: column 'rating': expected "
                                                    "a number (got 'good')"),
    ("ratings.csv", RATINGS.replace("2,4,5.0", "2,9,5.0"), "ratings.csv:6: column 'movieId': "
                                                          "movieId 9 has no row in movies.csv"),
    ("movies.csv", MOVIES.replace("4,Cosmos", "1,Cosmos"), "movies.csv:5: column 'movieId': "
                                                          "movieId 1 appears twice"),
])
def test_a_malformed_cell_is_named_with_file_line_and_column(release, tmp_path, capsys,
                                                             name, text, where):
    (release / name).write_text(text, encoding="utf-8")
    assert main(["convert-movielens", "--kind", "ml-latest", "--source", str(release),
                 "--out", str(tmp_path / "data")]) == 2
    assert where in capsys.readouterr().err


def test_a_missing_file_is_named(release, tmp_path, capsys):
    (release / "movies.csv").unlink()
    assert main(["convert-movielens", "--kind", "ml-latest", "--source", str(release),
                 "--out", str(tmp_path / "data")]) == 2
    assert "movies.csv: missing" in capsys.readouterr().err
