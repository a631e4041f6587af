"""The feature spec: which features feed which tower, and how.

A spec is written by the user as TOML and parsed once into frozen objects; every later
stage (training, export, serving) reads these objects, never the raw file. Example::

    [columns]                 # names of the id and time columns of the input tables
    user_id = "user_id"
    item_id = "item_id"
    timestamp = "timestamp"   # event time, UTC: a number in timestamp_unit, or ISO-8601
    timestamp_unit = "s"      # s | ms | us: the unit of a numeric timestamp

    [features.user_id]        # the user id itself is a categorical user feature
    tower = "user"
    kind = "categorical"
    embedding_dim = 32

    [features.hour_of_day]    # context derived from the event time
    tower = "context"
    kind = "categorical"
    dtype = "int"
    derive = "hour_of_day"

Kinds: ``categorical`` (one id per example, looked up in a vocabulary with OOV buckets,
or, with ``hash_buckets = N``, hashed into N buckets with no vocabulary),
``numeric`` (a float, normalised with training statistics), ``bag`` (a set of ids per
example, mean-pooled; "|"-separated in CSV), ``history`` (the user's earlier item ids,
most recent first, mean-pooled; computed from the interactions, never a column).

Missing values (an empty cell, NaN, a Parquet null; a feature a request leaves out) are
allowed for every feature but the id and time columns: categorical → its own "missing"
embedding row, apart from the OOV rows; numeric → the training mean (and, with
``missing_indicator = true``, one more 0/1 input saying it was missing); bag and
history → empty.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from contracts.errors import FeatureSpecError

Tower = Literal["user", "item", "context"]
Kind = Literal["categorical", "numeric", "bag", "history", "sequence"]
Derivation = Literal["hour_of_day", "day_of_week"]

TOWERS: tuple[str, ...] = ("user", "item", "context")
KINDS: tuple[str, ...] = ("categorical", "numeric", "bag", "history", "sequence")
DERIVATIONS: tuple[str, ...] = ("hour_of_day", "day_of_week")
TIMESTAMP_UNITS: tuple[str, ...] = ("s", "ms", "us")
BAG_SEPARATOR = "|"
# a sequence feature's second input: the time-gap bucket of each item (contracts.inputs)
GAPS_SUFFIX = "_gaps"
# sequence options: (key, smallest, largest, default); None in Feature = not a sequence
SEQUENCE_OPTIONS = (("blocks", 1, 4, 1), ("heads", 1, 16, 2), ("time_buckets", 2, 64, 32))


@dataclass(frozen=True)
class Feature:
    """One input feature of one tower."""

    name: str
    tower: Tower
    kind: Kind
    embedding_dim: int = 16
    oov_buckets: int = 1
    dtype: Literal["string", "int"] = "string"
    max_length: int = 20
    derive: Derivation | None = None
    # FarmHash Fingerprint64(utf-8 id) mod hash_buckets is the embedding row: no vocabulary
    # is computed or stored (for id spaces too large to list); None = a vocabulary
    hash_buckets: int | None = None
    # numeric only: one more input, 1.0 where the value was missing (NaN), else 0.0
    missing_indicator: bool = False
    # sequence only (SEQUENCE_OPTIONS; filled with their defaults for a sequence)
    blocks: int | None = None
    heads: int | None = None
    time_buckets: int | None = None

    @property
    def uses_vocabulary(self) -> bool:
        return self.kind in ("categorical", "bag") and self.hash_buckets is None

    @property
    def hashed(self) -> bool:
        return self.hash_buckets is not None

    @property
    def is_sequence(self) -> bool:
        return self.kind in ("bag", "history", "sequence")

    @property
    def input_names(self) -> tuple[str, ...]:
        """The tower inputs this feature takes: its ids, and for a sequence its time gaps."""
        return (self.name, self.name + GAPS_SUFFIX) if self.kind == "sequence" else (self.name,)

    def has_missing_row(self, spec: FeatureSpec) -> bool:
        """Whether a missing value ("") has its own embedding row: every categorical
        feature but the ids (never missing) and derived context (never missing)."""
        return (self.kind == "categorical" and self.derive is None
                and self.name not in (spec.columns.user_id, spec.columns.item_id))


@dataclass(frozen=True)
class Columns:
    user_id: str = "user_id"
    item_id: str = "item_id"
    timestamp: str = "timestamp"
    timestamp_unit: str = "s"  # of a numeric timestamp; ISO-8601 text needs none


@dataclass(frozen=True)
class FeatureSpec:
    columns: Columns
    features: tuple[Feature, ...]

    def tower(self, tower: Tower) -> tuple[Feature, ...]:
        return self._by_tower.get(tower, ())

    @cached_property
    def user_input_features(self) -> tuple[Feature, ...]:
        """Inputs of the exported user tower: user features, then context features."""
        return self.tower("user") + self.tower("context")

    @cached_property
    def _by_tower(self) -> dict[str, tuple[Feature, ...]]:
        """Each tower's features, once: the server asks on every call (the spec is frozen)."""
        towers: dict[str, tuple[Feature, ...]] = {}
        for f in self.features:
            towers[f.tower] = (*towers.get(f.tower, ()), f)
        return towers

    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, stored in model manifests."""
        features = {}
        for f in self.features:
            d = dataclasses.asdict(f)
            d.pop("name")
            if f.hashed:  # no vocabulary: its OOV count means nothing and is refused
                d.pop("oov_buckets")
            if not f.missing_indicator:  # left out at its default: fingerprints of specs
                d.pop("missing_indicator")  # written before the option stay the same
            features[f.name] = {k: v for k, v in d.items() if v is not None}
        columns = dataclasses.asdict(self.columns)
        if self.columns.timestamp_unit == "s":  # the same: the default is left out
            columns.pop("timestamp_unit")
        return {"columns": columns, "features": features}


_FEATURE_KEYS = {f.name for f in dataclasses.fields(Feature)} - {"name"}


def parse_feature_spec(doc: dict[str, Any], path: str = "<spec>") -> FeatureSpec:
    """Validate a parsed TOML (or manifest JSON) document into a FeatureSpec."""
    _reject_unknown(doc, {"columns", "features"}, path, "")
    columns_doc = doc.get("columns", {})
    _reject_unknown(columns_doc, {"user_id", "item_id", "timestamp", "timestamp_unit"}, path,
                    "columns.")
    if "timestamp_unit" in columns_doc:
        _require_choice(columns_doc, "timestamp_unit", TIMESTAMP_UNITS, path, "columns")
    for key, value in columns_doc.items():
        if not isinstance(value, str) or not value:
            raise FeatureSpecError(path, f"columns.{key}", f"must be a column name (got {value!r})")
    columns = Columns(**columns_doc)
    features_doc = doc.get("features")
    if not isinstance(features_doc, dict) or not features_doc:
        raise FeatureSpecError(path, "features", "at least one [features.NAME] table is needed")
    features = tuple(_parse_feature(n, d, path) for n, d in features_doc.items())
    spec = FeatureSpec(columns=columns, features=features)
    _check_towers(spec, path)
    _check_history_hashing(spec, path)
    _check_sequences(spec, path)
    return spec


def load_feature_spec(path: str | Path) -> FeatureSpec:
    path = str(path)
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise FeatureSpecError(path, "(file)", "no such file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise FeatureSpecError(path, "(syntax)", str(exc)) from exc
    try:
        return parse_feature_spec(doc, path)
    except FeatureSpecError as exc:
        line = _line_of(Path(path).read_text(errors="replace"), exc.key)
        if line is None:
            raise
        message = str(exc).removeprefix(f"{path}: {exc.key}: ")
        raise FeatureSpecError(f"{path}:{line}", exc.key, message) from exc


def _line_of(text: str, key: str) -> int | None:
    """The 1-based line of a dotted key ("features.x.heads") in a TOML file: the key's
    own line inside its table, else the table's header; None when neither is found."""
    lines = [line.split("#")[0].strip() for line in text.splitlines()]
    parts = key.split(".")
    for cut in range(len(parts), 0, -1):
        header = "[" + ".".join(parts[:cut]) + "]"
        if header not in lines:
            continue
        start = lines.index(header)
        if cut == len(parts):
            return start + 1
        for i in range(start + 1, len(lines)):
            if lines[i].startswith("["):
                break
            if lines[i].split("=")[0].strip() == parts[cut]:
                return i + 1
        return start + 1
    return None


def _parse_feature(name: str, doc: Any, path: str) -> Feature:
    key = f"features.{name}"
    if not isinstance(doc, dict):
        raise FeatureSpecError(path, key, "must be a table")
    _reject_unknown(doc, _FEATURE_KEYS, path, key + ".")
    _require_choice(doc, "tower", TOWERS, path, key)
    _require_choice(doc, "kind", KINDS, path, key)
    if "dtype" in doc:
        _require_choice(doc, "dtype", ("string", "int"), path, key)
    if "derive" in doc:
        _require_choice(doc, "derive", DERIVATIONS, path, key)
    for int_key, low in (("embedding_dim", 1), ("oov_buckets", 1), ("max_length", 1)):
        value = doc.get(int_key, low)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise FeatureSpecError(
                path, f"{key}.{int_key}", f"must be an integer >= {low} (got {value!r})"
            )
    _check_hash_buckets(doc, path, key)
    _check_missing_indicator(doc, path, key)
    doc = _sequence_options(doc, path, key)
    feature = Feature(name=name, **doc)
    if feature.derive is not None and feature.tower != "context":
        raise FeatureSpecError(path, f"{key}.derive", "only context features can be derived")
    if feature.kind in ("history", "sequence") and feature.tower != "user":
        raise FeatureSpecError(path, f"{key}.kind", f"{feature.kind} is a user-tower feature")
    return feature


def _sequence_options(doc: dict, path: str, key: str) -> dict:
    """A sequence's blocks, heads and time_buckets, checked and defaulted; refused on any
    other kind."""
    doc = dict(doc)
    for option, low, high, default in SEQUENCE_OPTIONS:
        if doc.get("kind") != "sequence":
            if option in doc:
                raise FeatureSpecError(path, f"{key}.{option}",
                                       f"only sequence features take {option} (got kind "
                                       f"{doc.get('kind')!r})")
            continue
        value = doc.setdefault(option, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise FeatureSpecError(path, f"{key}.{option}",
                                   f"must be an integer in [{low}, {high}] (got {value!r})")
    return doc


def _check_sequences(spec: FeatureSpec, path: str) -> None:
    """A sequence attends over item embeddings split into ``heads`` parts, and its gap
    input's name must be free."""
    width = spec.feature(spec.columns.item_id).embedding_dim
    names = {f.name for f in spec.features}
    for f in spec.features:
        if f.kind != "sequence":
            continue
        if width % f.heads:
            raise FeatureSpecError(
                path, f"features.{f.name}.heads",
                f"must divide the item embedding width (features.{spec.columns.item_id}."
                f"embedding_dim = {width}; got heads = {f.heads}): each head attends over "
                f"width / heads of it")
        if f.name + GAPS_SUFFIX in names:
            raise FeatureSpecError(
                path, f"features.{f.name + GAPS_SUFFIX}",
                f"the name is taken by the time-gap input of sequence features.{f.name}; "
                "rename one of the two")


def _check_hash_buckets(doc: dict, path: str, key: str) -> None:
    if "hash_buckets" not in doc:
        return
    value = doc["hash_buckets"]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise FeatureSpecError(path, f"{key}.hash_buckets",
                               f"must be an integer >= 1 (got {value!r})")
    if doc.get("kind") == "numeric":
        raise FeatureSpecError(path, f"{key}.hash_buckets",
                               "only categorical, bag and history features can be hashed")
    # a hashed feature has no vocabulary, so nothing for vocabulary options to configure
    for other, why in (("oov_buckets", "every id is hashed, there is no vocabulary to miss"),
                       ("derive", "a derived feature has a fixed vocabulary")):
        if other in doc:
            raise FeatureSpecError(path, f"{key}.hash_buckets",
                                   f"cannot be combined with {other} ({why}); remove one")


def _check_missing_indicator(doc: dict, path: str, key: str) -> None:
    if "missing_indicator" not in doc:
        return
    value = doc["missing_indicator"]
    if not isinstance(value, bool):
        raise FeatureSpecError(path, f"{key}.missing_indicator",
                               f"must be true or false (got {value!r})")
    if value and doc.get("kind") != "numeric":
        raise FeatureSpecError(path, f"{key}.missing_indicator",
                               f"only numeric features take a missing indicator (got kind "
                               f"{doc.get('kind')!r}); a missing categorical value has its "
                               "own embedding row, a missing bag is empty")


def _check_history_hashing(spec: FeatureSpec, path: str) -> None:
    """History shares the item id's lookup and embedding: hashed in both or neither."""
    item_id = spec.feature(spec.columns.item_id)
    for f in spec.features:
        if f.kind in ("history", "sequence") and f.hash_buckets != item_id.hash_buckets:
            raise FeatureSpecError(
                path, f"features.{f.name}.hash_buckets",
                f"a history shares the item id's lookup and embedding, so it must be hashed "
                f"as features.{item_id.name} is (hash_buckets {item_id.hash_buckets!r}; got "
                f"{f.hash_buckets!r}): set the same hash_buckets on both, or on neither",
            )


def _check_towers(spec: FeatureSpec, path: str) -> None:
    cols = spec.columns
    # the user id column always identifies the user; as a feature it is optional (a
    # history-as-user tower has none), but the user tower needs some input
    if not spec.user_input_features:
        raise FeatureSpecError(
            path, "features",
            f"the user tower has no feature: add the user id {cols.user_id!r} as a categorical "
            "feature, a history, or other user or context features",
        )
    if not any(f.name == cols.item_id for f in spec.tower("item")):
        raise FeatureSpecError(
            path, f"features.{cols.item_id}",
            f"the item tower needs the item id column {cols.item_id!r} as a categorical feature",
        )
    for f in spec.features:
        if f.name in (cols.user_id, cols.item_id) and f.kind != "categorical":
            raise FeatureSpecError(path, f"features.{f.name}.kind", "an id must be categorical")


def _require_choice(doc: dict, key: str, choices: tuple[str, ...], path: str, prefix: str) -> None:
    value = doc.get(key)
    if value not in choices:
        raise FeatureSpecError(
            path, f"{prefix}.{key}", f"must be one of {', '.join(choices)} (got {value!r})"
        )


def _reject_unknown(doc: Any, allowed: set[str], path: str, prefix: str) -> None:
    if not isinstance(doc, dict):
        raise FeatureSpecError(path, prefix.rstrip(".") or "(top)", "must be a table")
    for key in doc:
        if key not in allowed:
            raise FeatureSpecError(
                path, f"{prefix}{key}",
                f"unknown key; expected one of {', '.join(sorted(allowed))}",
            )
