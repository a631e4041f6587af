"""The project's one error tree. Each class knows its gRPC status, by name so that this
module needs no grpc, and, where it has one, the request field it is about. The service
maps them in one place (retrieval.errors.status_of, called by its one error boundary); the
command line prints them with the file, line and column they name.

    TwoTowerError                  INTERNAL: not for callers; logged with its traceback
    ├── FeatureSpecError           a feature spec (TOML) is malformed; names the file and key
    ├── DataError                  an input table is malformed; names file, line and column
    ├── ConfigError                a flag, file or variable of a configuration is wrong
    ├── ArtifactError              FAILED_PRECONDITION: a model or index artifact is missing,
    │                              corrupt or mismatched; names the file
    └── RequestError               what a caller did or may retry; ``field`` names the field
        ├── InvalidArgument        INVALID_ARGUMENT: a request field is wrong
        ├── NotFound               NOT_FOUND: e.g. an item id the served index lacks
        ├── FailedPrecondition     FAILED_PRECONDITION: e.g. no model and index loaded yet
        ├── DeadlineExceeded       DEADLINE_EXCEEDED: the caller's deadline passed
        ├── ResourceExhausted      RESOURCE_EXHAUSTED: the queue is full, a reply too large
        └── Unavailable            UNAVAILABLE: the feature store cannot answer, or the
                                   server is stopping; the caller may retry

Messages say what was expected and what came; a caller's value is quoted through
``quote`` (at most a short prefix), never whole.
"""

from __future__ import annotations

QUOTE_CHARS = 64


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """``repr`` of at most the first ``limit`` characters of ``value``, with the length
    when it was cut: error messages and logs never carry a caller's value whole."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text) if isinstance(value, str) else text
    return f"{text[:limit]!r}… ({len(text)} characters)"


class TwoTowerError(Exception):
    """Base of every error this project raises on purpose."""

    grpc_status = "INTERNAL"


class FeatureSpecError(TwoTowerError, ValueError):
    def __init__(self, path: str, key: str, message: str) -> None:
        super().__init__(f"{path}: {key}: {message}")
        self.path, self.key = path, key


class DataError(TwoTowerError, ValueError):
    def __init__(
        self, path: str, message: str, *, line: int | None = None, column: str | None = None
    ) -> None:
        where = path
        if line is not None:
            where += f":{line}"
        if column is not None:
            where += f": column {column!r}"
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.column = path, line, column


class ConfigError(TwoTowerError, ValueError):
    """A configuration (flags, a file or variable they name) is wrong; says which."""


class ArtifactError(TwoTowerError):
    grpc_status = "FAILED_PRECONDITION"

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class RequestError(TwoTowerError):
    """An error a caller receives as it is: ``field`` (when there is one) and ``detail``."""

    def __init__(self, field_or_detail: str, detail: str | None = None) -> None:
        field, detail = (None, field_or_detail) if detail is None else (field_or_detail, detail)
        super().__init__(detail if field is None else f"{field}: {detail}")
        self.field, self.detail = field, detail

    def within(self, prefix: str) -> RequestError:
        """The same error about ``prefix.field`` (``requests[3].k`` for a batch's 4th
        request's ``k``), of the same class."""
        field = prefix if self.field is None else f"{prefix}.{self.field}"
        return type(self)(field, self.detail)

    def public_message(self) -> str:
        """What the caller is told (the message, unless a subclass hides details)."""
        return str(self)


class InvalidArgument(RequestError):
    grpc_status = "INVALID_ARGUMENT"


class NotFound(RequestError):
    grpc_status = "NOT_FOUND"


class FailedPrecondition(RequestError):
    grpc_status = "FAILED_PRECONDITION"


class DeadlineExceeded(RequestError):
    grpc_status = "DEADLINE_EXCEEDED"


class ResourceExhausted(RequestError):
    grpc_status = "RESOURCE_EXHAUSTED"


class Unavailable(RequestError):
    grpc_status = "UNAVAILABLE"
