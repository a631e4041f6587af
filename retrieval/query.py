"""A Retrieve request as a plain, validated value; no protobuf below the servicer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from contracts.errors import InvalidArgument
from contracts.feature_spec import Feature, FeatureSpec

ContextValue = str | int | float
DERIVED_RANGES = {"hour_of_day": range(24), "day_of_week": range(7)}


@dataclass(frozen=True)
class Limits:
    max_k: int = 1000
    max_user_id_bytes: int = 256
    max_item_id_bytes: int = 256       # recorded or passed as history: it is stored and logged
    max_request_id_bytes: int = 128    # echoed in the reply and in every log line
    max_recent_items: int = 1000
    max_exclude_items: int = 10000
    max_interactions: int = 1000
    max_batch_requests: int = 1000


@dataclass(frozen=True)
class RetrieveQuery:
    user_id: str
    k: int
    context: dict[str, ContextValue]
    event_time: int                  # seconds since the epoch, UTC
    recent_item_ids: tuple[str, ...]  # most recent first; replaces stored history when set
    exclude_item_ids: frozenset[str]
    request_id: str
    rules: ItemRules = field(default_factory=lambda: ItemRules({}, {}))
    exclude_seen: bool = False


@dataclass(frozen=True)
class ItemRules:
    """Metadata rules of one request: column → accepted (allow) or refused (block) values."""

    allow: dict[str, frozenset[str]]
    block: dict[str, frozenset[str]]

    def __bool__(self) -> bool:
        return bool(self.allow or self.block)

    def key(self) -> tuple:
        """Hashable form: requests with equal rules share one filtered search."""
        return (tuple(sorted(self.allow.items())), tuple(sorted(self.block.items())))


def validate_query(query: RetrieveQuery, spec: FeatureSpec, limits: Limits) -> None:
    """Raise InvalidArgument naming the first bad field."""
    if not 1 <= query.k <= limits.max_k:
        raise InvalidArgument("k", f"must be in [1, {limits.max_k}] (got {query.k})")
    if not query.user_id:
        raise InvalidArgument("user_id", "must be non-empty")
    if len(query.user_id.encode()) > limits.max_user_id_bytes:
        raise InvalidArgument("user_id", f"must be at most {limits.max_user_id_bytes} bytes "
                              f"(got {len(query.user_id.encode())})")
    if len(query.request_id.encode()) > limits.max_request_id_bytes:
        raise InvalidArgument("request_id", f"must be at most {limits.max_request_id_bytes} "
                              f"bytes (got {len(query.request_id.encode())})")
    _check_count("recent_item_ids", len(query.recent_item_ids), limits.max_recent_items)
    for i, item_id in enumerate(query.recent_item_ids):
        _check_item_id(f"recent_item_ids[{i}]", item_id, limits)
    _check_count("exclude_item_ids", len(query.exclude_item_ids), limits.max_exclude_items)
    if query.event_time < 0:
        raise InvalidArgument("event_time_unix_seconds", f"must be >= 0 (got {query.event_time})")
    for column, values in query.rules.allow.items():
        if not values:
            raise InvalidArgument(f"allow[{column!r}]", "give at least one value (an empty "
                                  "list would allow no item; leave the column out instead)")
    known = {f.name: f for f in spec.tower("context")}
    for key, value in query.context.items():
        if key not in known:
            raise InvalidArgument(f"context[{key!r}]", "unknown context feature; the model "
                                  f"knows: {', '.join(sorted(known)) or '(none)'}")
        _check_context_value(f"context[{key!r}]", known[key], value)


def _check_item_id(field: str, item_id: str, limits: Limits) -> None:
    # a character is at most 4 UTF-8 bytes: short ids need no encoding to pass
    if (len(item_id) > limits.max_item_id_bytes // 4
            and len(item_id.encode()) > limits.max_item_id_bytes):
        raise InvalidArgument(field, f"must be at most {limits.max_item_id_bytes} bytes "
                              f"(got {len(item_id.encode())})")


def _check_count(field: str, count: int, limit: int) -> None:
    if count > limit:
        raise InvalidArgument(field, f"at most {limit} ids (got {count})")


def _check_context_value(field: str, feature: Feature, value: ContextValue) -> None:
    if feature.kind == "numeric":
        if isinstance(value, str):
            raise InvalidArgument(field, f"expected double_value or int_value (got string {value!r})")
        if not math.isfinite(value):
            raise InvalidArgument(field, f"must be finite (got {value})")
    elif feature.dtype == "int":
        if not isinstance(value, int):
            raise InvalidArgument(field, f"expected int_value (got {type(value).__name__} {value!r})")
        allowed = DERIVED_RANGES.get(feature.derive or "")
        if allowed is not None and value not in allowed:
            raise InvalidArgument(field, f"must be in [{allowed.start}, {allowed.stop - 1}] (got {value})")
    elif not isinstance(value, str):
        raise InvalidArgument(field, f"expected string_value (got {type(value).__name__} {value!r})")


def validate_interactions(events: list[tuple[str, str]], limits: Limits,
                          batch: bool = True) -> None:
    """Raise InvalidArgument naming the first bad field: ``interactions[3].item_id`` in the
    batch form, ``item_id`` for a single interaction."""
    if batch and not 1 <= len(events) <= limits.max_interactions:
        raise InvalidArgument("interactions", f"must hold 1 to {limits.max_interactions} "
                              f"interactions (got {len(events)})")
    for i, (user_id, item_id) in enumerate(events):
        prefix = f"interactions[{i}]." if batch else ""
        if not user_id:
            raise InvalidArgument(prefix + "user_id", "must be non-empty")
        if len(user_id.encode()) > limits.max_user_id_bytes:
            raise InvalidArgument(prefix + "user_id",
                                  f"must be at most {limits.max_user_id_bytes} bytes")
        if not item_id:
            raise InvalidArgument(prefix + "item_id", "must be non-empty")
        _check_item_id(prefix + "item_id", item_id, limits)
