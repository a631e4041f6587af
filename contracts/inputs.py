"""Raw model inputs, built the same way in training and at serving time.

Both towers take a dict of NumPy arrays keyed by feature name:

* categorical → object array of str, shape [n] ("" = missing: the feature's own missing
                row in the model; an id training never saw is OOV instead)
* numeric     → float32, shape [n] (NaN = missing: the training mean, and the 0/1
                missing indicator when the spec asks for one)
* bag/history → object array of str, shape [n, max_length], padded with "" (missing =
                empty)
* sequence    → the ids as a history, and under ``<name>_gaps`` int32 [n, max_length]:
                each item's age bucket (``gap_buckets``; 0 = padding or unknown time)

A missing value is the same in training (an empty cell, a null or NaN in a table; a user
absent from the users table) and at serving (a feature the store does not hold for the
user, a context feature the request leaves out or sends without a value, "" or NaN).

Context features derived from the event time (hour of day, day of week, UTC) are computed
here and nowhere else, so training and serving cannot disagree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from contracts.dataset import Dataset
from contracts.feature_spec import GAPS_SUFFIX, Feature, FeatureSpec

PAD = ""
SECONDS_PER_HOUR = 3600
SECONDS_PER_DAY = 86400
EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday; Monday = 0


def derive_context(derivation: str, timestamps: np.ndarray) -> np.ndarray:
    """Context values from event times in seconds since the epoch (UTC), as id strings."""
    ts = np.asarray(timestamps, dtype=np.int64)
    if derivation == "hour_of_day":
        values = (ts // SECONDS_PER_HOUR) % 24
    elif derivation == "day_of_week":
        values = (ts // SECONDS_PER_DAY + EPOCH_WEEKDAY) % 7
    else:
        raise ValueError(f"unknown derivation {derivation!r}")
    return values.astype(str).astype(object)


def pad_sequences(rows: Sequence[Sequence[str]], max_length: int) -> np.ndarray:
    """[n] sequences of ids → [n, max_length] object array, truncated, padded with ""."""
    out = np.full((len(rows), max_length), PAD, dtype=object)
    for i, row in enumerate(rows):
        row = tuple(row)[:max_length]
        out[i, : len(row)] = row
    return out


def item_inputs(spec: FeatureSpec, items: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Item-tower inputs for every row of an item table."""
    return {f.name: _column(f, items[f.name]) for f in spec.tower("item")}


def training_examples(dataset: Dataset) -> dict[str, np.ndarray]:
    """One example per interaction: user, context and item features, and the user's
    history strictly before the event (most recent first), so nothing leaks from the future.
    """
    spec, inter = dataset.spec, dataset.interactions
    cols = spec.columns
    examples: dict[str, np.ndarray] = {}
    user_rows = _join_rows(inter[cols.user_id], dataset.users[cols.user_id])
    item_rows = _join_rows(inter[cols.item_id], dataset.items[cols.item_id])
    for f in spec.features:
        if f.kind == "history":
            examples[f.name] = _histories(inter, cols, f.max_length)[0]
        elif f.kind == "sequence":
            examples[f.name], gaps = _histories(inter, cols, f.max_length)
            examples[f.name + GAPS_SUFFIX] = gap_buckets(gaps, f.time_buckets)
        elif f.name in (cols.user_id, cols.item_id) or (f.tower == "context" and not f.derive):
            examples[f.name] = _column(f, inter[f.name])
        elif f.derive:
            examples[f.name] = derive_context(f.derive, inter[cols.timestamp])
        elif f.tower == "user":
            examples[f.name] = _column(f, _take(dataset.users[f.name], user_rows, f))
        else:
            examples[f.name] = _column(f, _take(dataset.items[f.name], item_rows, f))
    return examples


def _column(f: Feature, values: np.ndarray) -> np.ndarray:
    if f.kind == "numeric":
        return np.asarray(values, dtype=np.float32)
    if f.is_sequence:
        return pad_sequences(values, f.max_length)
    return np.asarray(values, dtype=object)


def _join_rows(keys: np.ndarray, table_keys: np.ndarray) -> np.ndarray:
    """Row of each key in the table, -1 where absent."""
    if len(table_keys) == 0:
        return np.full(len(keys), -1)
    order = np.argsort(table_keys.astype(str))
    sorted_keys = table_keys.astype(str)[order]
    pos = np.searchsorted(sorted_keys, keys.astype(str)).clip(0, len(sorted_keys) - 1)
    found = sorted_keys[pos] == keys.astype(str)
    return np.where(found, order[pos], -1)


def _take(values: np.ndarray, rows: np.ndarray, f: Feature) -> np.ndarray:
    missing = rows < 0
    taken = values[np.where(missing, 0, rows)] if len(values) else np.empty(len(rows), object)
    if f.kind == "numeric":
        taken = taken.astype(np.float32)
        taken[missing] = np.nan
    elif f.kind == "bag":  # one by one: NumPy would broadcast () as no values at all
        for row in np.flatnonzero(missing):
            taken[row] = ()
    else:
        taken[missing] = PAD
    return taken


def _histories(inter: Mapping[str, np.ndarray], cols, max_length: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Each event's earlier items [n, max_length] (most recent first, "" padded) and their
    ages at the event in seconds, float64 [n, max_length] (NaN for padding)."""
    users = inter[cols.user_id].astype(str)
    times = np.asarray(inter[cols.timestamp], dtype=np.int64)
    order = np.lexsort((np.arange(len(users)), times, users))
    items_sorted, users_sorted, times_sorted = inter[cols.item_id][order], users[order], times[order]
    history_sorted = np.full((len(users), max_length), PAD, dtype=object)
    gaps_sorted = np.full((len(users), max_length), np.nan)
    for lag in range(1, max_length + 1):
        same_user = np.zeros(len(users), dtype=bool)
        same_user[lag:] = users_sorted[lag:] == users_sorted[:-lag]
        history_sorted[lag:, lag - 1][same_user[lag:]] = items_sorted[:-lag][same_user[lag:]]
        gap = (times_sorted[lag:] - times_sorted[:-lag]).astype(np.float64)
        gaps_sorted[lag:, lag - 1][same_user[lag:]] = gap[same_user[lag:]]
    history, gaps = np.empty_like(history_sorted), np.empty_like(gaps_sorted)
    history[order], gaps[order] = history_sorted, gaps_sorted
    return history, gaps


def gap_buckets(gaps: np.ndarray, time_buckets: int) -> np.ndarray:
    """Ages in seconds (float, NaN = padding or unknown) → int32 buckets of the same shape:
    0 for NaN, else 1 + min(floor(log2(1 + max(age, 0))), time_buckets - 1). Computed here
    only, for training and serving alike."""
    gaps = np.asarray(gaps, dtype=np.float64)
    known = np.isfinite(gaps)
    octave = np.floor(np.log2(1.0 + np.maximum(np.where(known, gaps, 0.0), 0.0)))
    return np.where(known, 1 + np.minimum(octave, time_buckets - 1), 0).astype(np.int32)


def user_inputs(spec: FeatureSpec, requests: Sequence[UserRequest]) -> dict[str, np.ndarray]:
    """User-tower inputs for online requests, one row per request.

    Missing values are missing the way training saw them: "" for categorical (→ its
    missing row), NaN for numeric (→ training mean), empty bags and histories.
    """
    cols = spec.columns
    out: dict[str, np.ndarray] = {}
    for f in spec.user_input_features:
        if f.name == cols.user_id:
            out[f.name] = np.array([r.user_id for r in requests], dtype=object)
        elif f.kind == "history":
            out[f.name] = pad_sequences([r.history for r in requests], f.max_length)
        elif f.kind == "sequence":
            out[f.name] = pad_sequences([r.history for r in requests], f.max_length)
            out[f.name + GAPS_SUFFIX] = gap_buckets(_ages(requests, f.max_length),
                                                    f.time_buckets)
        elif f.derive:
            out[f.name] = _derived(f, requests)
        else:
            values = np.empty(len(requests), dtype=object)
            for i, r in enumerate(requests):
                source = r.context if f.tower == "context" else r.features
                values[i] = _value(f, source.get(f.name))
            out[f.name] = _column(f, values)
    return out


class UserRequest:
    """What one request knows about its user: stored features, history and context.
    ``history_times``: each history item's time in seconds since the epoch, None (or a
    negative number) where unknown (empty: every time unknown), for sequence features'
    ages."""

    __slots__ = ("context", "event_time", "features", "history", "history_times", "user_id")

    def __init__(self, user_id: str, features: Mapping[str, object], history: Sequence[str],
                 context: Mapping[str, object], event_time: int,
                 history_times: Sequence[int | None] = ()) -> None:
        self.user_id, self.features, self.history = user_id, features, tuple(history)
        self.context, self.event_time = context, event_time
        self.history_times = tuple(history_times)


def _ages(requests: Sequence[UserRequest], max_length: int) -> np.ndarray:
    """[n, max_length] float64: event_time minus each history item's time, NaN unknown."""
    out = np.full((len(requests), max_length), np.nan)
    for i, r in enumerate(requests):
        for j, t in enumerate(r.history_times[: min(max_length, len(r.history))]):
            if t is not None and t >= 0:
                out[i, j] = r.event_time - t
    return out


def _derived(f: Feature, requests: Sequence[UserRequest]) -> np.ndarray:
    derived = derive_context(f.derive, np.array([r.event_time for r in requests], np.int64))
    given = [r.context.get(f.name) for r in requests]
    return np.array([d if g is None else str(g) for d, g in zip(derived, given, strict=True)],
                    dtype=object)


def _value(f: Feature, value: object) -> object:
    if value is None:  # left out, or sent without a value: missing
        return np.nan if f.kind == "numeric" else (() if f.kind == "bag" else PAD)
    if f.kind == "categorical":
        return str(value)
    if f.kind == "bag":
        return tuple(str(v) for v in value)
    return value


def histories_from_other_items(users: np.ndarray, items: np.ndarray, max_length: int,
                               seed: int = 0) -> np.ndarray:
    """For protocols without time (random splits): each example's history is up to
    ``max_length`` of the same user's *other* items, in random order — never its target.

    users, items [n] (one row per example) → [n, max_length] object array padded with "".
    Users with more other items than fit get a random draw (with replacement) per example.
    """
    rng = np.random.default_rng(seed)
    out = np.full((len(users), max_length), PAD, dtype=object)
    order = np.argsort(users.astype(str), kind="stable")
    sorted_users = users.astype(str)[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    for start, end in zip(starts, np.r_[starts[1:], len(order)], strict=True):
        rows = order[start:end]
        n = len(rows)
        if n == 1:
            continue
        width = min(n - 1, max_length)
        if n - 1 <= max_length:  # all other items: index i skips the example's own position
            pick = np.tile(np.arange(n - 1), (n, 1))
        else:
            pick = rng.integers(0, n - 1, (n, width))
        pick = pick + (pick >= np.arange(n)[:, None])
        out[rows, :width] = items[rows][pick]
    return out


def item_bags(users: np.ndarray, items: np.ndarray, user_ids: np.ndarray, max_length: int,
              seed: int = 0) -> np.ndarray:
    """For evaluation without time: each user's items as a history (random ``max_length``
    of them when there are more). → [len(user_ids), max_length] object array."""
    rng = np.random.default_rng(seed)
    out = np.full((len(user_ids), max_length), PAD, dtype=object)
    position = {u: i for i, u in enumerate(np.asarray(user_ids).astype(str).tolist())}
    by_user: dict[int, list] = {}
    for u, item in zip(users.astype(str).tolist(), items.tolist(), strict=True):
        by_user.setdefault(position[u], []).append(item)
    for row, bag in by_user.items():
        if len(bag) > max_length:
            bag = rng.choice(np.array(bag, dtype=object), max_length, replace=False).tolist()
        out[row, : len(bag)] = bag
    return out
