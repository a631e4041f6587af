"""The CLI on bad input: an error naming file, line and column, and no artifact left."""

from __future__ import annotations


import pytest
import redis

from app.cli import main


def _csv_dataset(tmp_path):
    """The tiny synthetic dataset written as CSV, which a user can break by hand."""
    from tests.conftest import TINY
    from contracts.dataset import write_dataset
    from training.synthetic import SyntheticConfig, generate_synthetic

    dataset, spec_toml = generate_synthetic(SyntheticConfig(**TINY))
    write_dataset(dataset, tmp_path / "data", spec_toml, "csv")
    return tmp_path / "data"


def _edit_line(path, number: int, edit) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = edit(lines[number - 1])
    path.write_text("\n".join(lines) + "\n")


BREAKS = {
    "a row with a field missing": (
        "interactions.csv", 5, lambda line: line.rsplit(",", 1)[0],
        "interactions.csv:5: column 'device': row has 3 fields, the header 4"),
    "a row with a field too many": (
        "interactions.csv", 7, lambda line: line + ",x",
        "interactions.csv:7: column '(beyond the header)': row has 5 fields, the header 4"),
    "a timestamp that is not a number": (
        "interactions.csv", 4, lambda line: ",".join(line.split(",")[:2] + ["soon", "tv"]),
        "interactions.csv:4: column 'timestamp': timestamp must be seconds since the epoch"),
    "a missing column": (
        "interactions.csv", 1, lambda line: line.replace('"timestamp"', '"ts"'),
        "interactions.csv:1: column 'timestamp': missing column"),
    "a malformed feature spec": (
        "features.toml", 3, lambda line: line.replace("=", "= ="),
        "features.toml: (syntax): Invalid value (at line 3, column"),
}


@pytest.fixture(params=list(BREAKS))
def broken(request, pipeline, tmp_path):
    data = _csv_dataset(tmp_path)
    name, line, edit, message = BREAKS[request.param]
    _edit_line(data / name, line, edit)
    return data, message


@pytest.mark.slow
def test_train_on_bad_input_names_file_line_and_column_and_writes_no_model(broken, tmp_path,
                                                                           capsys):
    data, message = broken
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "models"),
                 "--epochs", "1"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


@pytest.mark.slow
def test_load_features_on_bad_input_writes_nothing_to_redis(broken, redis_url, capsys):
    data, message = broken
    assert main(["load-features", "--data", str(data), "--redis-url", redis_url]) == 2
    assert message in capsys.readouterr().err
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0


@pytest.mark.slow
def test_build_index_on_a_bad_items_table_leaves_the_store_as_it_was(pipeline, tmp_path,
                                                                   capsys):
    data = _csv_dataset(tmp_path)
    _edit_line(data / "items.csv", 6, lambda line: line + ",x")
    store = tmp_path / "indexes"
    assert main(["build-index", "--model", str(pipeline.model_dir), "--out", str(store),
                 "--items", str(data / "items.csv"), "--index", "Flat"]) == 2
    assert "items.csv:6: column '(beyond the header)': row has" in capsys.readouterr().err
    assert not store.exists() or not any(store.iterdir())
