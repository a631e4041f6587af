"""The feature spec a user writes: what parses, and what the errors tell them."""

from __future__ import annotations

import tomllib

import pytest

from contracts.errors import FeatureSpecError
from contracts.feature_spec import load_feature_spec, parse_feature_spec
from training.synthetic import SPEC_TOML

MINIMAL = """
[features.user_id]
tower = "user"
kind = "categorical"

[features.item_id]
tower = "item"
kind = "categorical"
"""


def parse(text: str):
    return parse_feature_spec(tomllib.loads(text), "spec.toml")


def test_every_feature_lands_in_its_tower_with_its_kind():
    spec = parse(SPEC_TOML)
    assert [f.name for f in spec.tower("user")] == ["user_id", "age", "country", "recent_items"]
    assert [f.name for f in spec.tower("context")] == ["hour_of_day", "day_of_week", "device"]
    assert spec.feature("tags").kind == "bag" and spec.feature("tags").max_length == 4
    assert spec.feature("hour_of_day").derive == "hour_of_day"


def test_defaults_fill_what_the_user_left_out():
    spec = parse(MINIMAL)
    assert spec.columns.timestamp == "timestamp"
    assert spec.feature("user_id").embedding_dim == 16 and spec.feature("user_id").oov_buckets == 1


def test_round_trips_through_the_manifest_form():
    spec = parse(SPEC_TOML)
    assert parse_feature_spec(spec.to_dict()) == spec


@pytest.mark.parametrize("extra, key, message", [
    ('[features.x]\ntower = "user"\nkind = "nmeric"', "features.x.kind", "must be one of"),
    ('[features.x]\ntower = "users"\nkind = "numeric"', "features.x.tower", "must be one of"),
    ('[features.x]\ntower = "user"\nkind = "numeric"\ncolour = 1', "features.x.colour",
     "unknown key"),
    ('[features.x]\ntower = "user"\nkind = "bag"\nmax_length = 0', "features.x.max_length",
     "must be an integer >= 1"),
    ('[features.x]\ntower = "user"\nkind = "categorical"\nderive = "hour_of_day"',
     "features.x.derive", "only context features"),
    ('[features.x]\ntower = "item"\nkind = "history"', "features.x.kind", "history is a user"),
])
def test_a_bad_feature_names_its_key(extra, key, message):
    with pytest.raises(FeatureSpecError) as err:
        parse(MINIMAL + extra)
    assert str(err.value).startswith(f"spec.toml: {key}: {message}")


def test_the_ids_must_be_features_of_their_towers():
    with pytest.raises(FeatureSpecError, match="features.item_id: the item tower needs"):
        parse(MINIMAL.replace('tower = "item"', 'tower = "user"'))


def test_unknown_top_level_key_is_refused():
    with pytest.raises(FeatureSpecError, match="spec.toml: model: unknown key"):
        parse(MINIMAL + "\n[model]\ndim = 3\n")


def test_toml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "features.toml"
    path.write_text(MINIMAL + "\n[features.broken\n")
    with pytest.raises(FeatureSpecError, match=r"features.toml: \(syntax\): .*line 10"):
        load_feature_spec(path)
