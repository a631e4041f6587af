"""A Retrieve request as a plain, validated value; no protobuf below the servicer.

Every field a caller sends is bounded (``Limits``), and a caller's value reaches an error
message only through ``quote`` (a short prefix and the length): a whole 100 KiB value in a
status message overflowed gRPC's 16 KiB metadata limit and turned INVALID_ARGUMENT into
RESOURCE_EXHAUSTED. Field names built from a caller's key are quoted the same way
(``context_field``, ``rule_field``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from contracts.errors import InvalidArgument, quote
from contracts.feature_spec import Feature, FeatureSpec

ContextValue = str | int | float
DERIVED_RANGES = {"hour_of_day": range(24), "day_of_week": range(7)}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each is documented in the .proto and docs/api.md."""

    max_k: int = 1000
    max_user_id_bytes: int = 256
    max_item_id_bytes: int = 256       # recorded or passed as history: it is stored and logged
    max_request_id_bytes: int = 128    # echoed in the reply and in every log line
    max_recent_items: int = 1000
    max_exclude_items: int = 10000
    max_interactions: int = 1000
    max_batch_requests: int = 1000
    # BatchRetrieve: sum of k over its requests. 10,000 candidates of 256-byte ids is a
    # 2.7 MB reply, under gRPC's default 4 MiB a client accepts (1000 x 1000 was 13 MB).
    max_batch_candidates: int = 10_000
    max_name_bytes: int = 128          # a context key or an allow / block column name
    max_context_value_bytes: int = 256  # a context string_value (a vocabulary entry)


@dataclass(frozen=True)
class RetrieveQuery:
    user_id: str
    k: int
    context: dict[str, ContextValue | None]  # None: a missing value, as if left out
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
    _check_rules(query.rules, limits)
    _check_context(query.context, spec, limits)


def _check_rules(rules: ItemRules, limits: Limits) -> None:
    for name, columns in (("allow", rules.allow), ("block", rules.block)):
        for column, values in columns.items():
            _check_name(rule_field(name, column), column, limits)
            if name == "allow" and not values:
                raise InvalidArgument(rule_field(name, column), "give at least one value (an "
                                      "empty list would allow no item; leave the column out "
                                      "instead)")


def _check_context(context: dict[str, ContextValue | None], spec: FeatureSpec, limits: Limits) -> None:
    known = {f.name: f for f in spec.tower("context")}
    for key, value in context.items():
        field_name = context_field(key)
        _check_name(field_name, key, limits)
        if key not in known:
            raise InvalidArgument(field_name, "unknown context feature; the model "
                                  f"knows: {', '.join(sorted(known)) or '(none)'}")
        if isinstance(value, str) and _over(value, limits.max_context_value_bytes):
            raise InvalidArgument(field_name, "string_value must be at most "
                                  f"{limits.max_context_value_bytes} bytes "
                                  f"(got {len(value.encode())})")
        _check_context_value(field_name, known[key], value)


def context_field(key: str) -> str:
    """``context['device']``; a long key is quoted as a short prefix with its length."""
    return f"context[{quote(key)}]"


def rule_field(rule: str, column: str) -> str:
    """``allow['category']`` (rule: allow | block), quoted as ``context_field``."""
    return f"{rule}[{quote(column)}]"


def validate_similar(item_id: str, k: int, exclude_item_ids: frozenset[str],
                     limits: Limits) -> None:
    """Raise InvalidArgument naming the first bad field of a SimilarItems request."""
    if not 1 <= k <= limits.max_k:
        raise InvalidArgument("k", f"must be in [1, {limits.max_k}] (got {k})")
    if not item_id:
        raise InvalidArgument("item_id", "must be non-empty")
    _check_item_id("item_id", item_id, limits)
    _check_count("exclude_item_ids", len(exclude_item_ids), limits.max_exclude_items)


def check_batch_size(queries: list[RetrieveQuery], limits: Limits) -> None:
    """How many requests a BatchRetrieve holds (checked before any of them)."""
    if not 1 <= len(queries) <= limits.max_batch_requests:
        raise InvalidArgument("requests", f"must hold 1 to {limits.max_batch_requests} "
                              f"requests (got {len(queries)})")


def check_batch_candidates(queries: list[RetrieveQuery], limits: Limits) -> None:
    """How many candidates a BatchRetrieve's reply may carry in all (each k is valid)."""
    total = sum(q.k for q in queries)
    if total > limits.max_batch_candidates:
        raise InvalidArgument("requests", f"the sum of k over the requests must be at most "
                              f"{limits.max_batch_candidates} (got {total}); split the batch")


def _check_name(field: str, name: str, limits: Limits) -> None:
    if _over(name, limits.max_name_bytes):
        raise InvalidArgument(field, f"the name must be at most {limits.max_name_bytes} bytes "
                              f"(got {len(name.encode())})")


def _over(text: str, max_bytes: int) -> bool:
    # a character is at most 4 UTF-8 bytes: short strings need no encoding to pass
    return len(text) > max_bytes // 4 and len(text.encode()) > max_bytes


def _check_item_id(field: str, item_id: str, limits: Limits) -> None:
    if _over(item_id, limits.max_item_id_bytes):
        raise InvalidArgument(field, f"must be at most {limits.max_item_id_bytes} bytes "
                              f"(got {len(item_id.encode())})")


def _check_count(field: str, count: int, limit: int) -> None:
    if count > limit:
        raise InvalidArgument(field, f"at most {limit} ids (got {count})")


def _check_context_value(field: str, feature: Feature, value: ContextValue | None) -> None:
    if value is None:  # a missing value, which every context feature may have
        return
    if feature.kind == "numeric":
        if isinstance(value, str):
            raise InvalidArgument(field, f"expected double_value or int_value (got string {quote(value)})")
        if math.isinf(value):  # NaN is a missing value (the training mean); inf is wrong
            raise InvalidArgument(field, f"must be finite, or NaN for a missing value (got {value})")
    elif feature.dtype == "int":
        if not isinstance(value, int):
            raise InvalidArgument(field, f"expected int_value (got {type(value).__name__} {quote(value)})")
        allowed = DERIVED_RANGES.get(feature.derive or "")
        if allowed is not None and value not in allowed:
            raise InvalidArgument(field, f"must be in [{allowed.start}, {allowed.stop - 1}] (got {value})")
    elif not isinstance(value, str):
        raise InvalidArgument(field, f"expected string_value (got {type(value).__name__} {quote(value)})")


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
