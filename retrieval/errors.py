"""The service's one mapping from exceptions to gRPC statuses (the tree: contracts.errors).

``status_of`` is called by the server's one error boundary (retrieval.servicer). An error of
ours carries its status by name; anything else is INTERNAL with a fixed message: its
details go to the log, never to the caller.
"""

from __future__ import annotations

import grpc

from contracts.errors import (  # noqa: F401  (the service's errors, importable from here)
    ArtifactError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RequestError,
    ResourceExhausted,
    TwoTowerError,
    Unavailable,
)


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status to return for ``exc``; None when it is not for callers (→ INTERNAL, logged)."""
    if not isinstance(exc, TwoTowerError) or exc.grpc_status == "INTERNAL":
        return None
    message = exc.public_message() if isinstance(exc, RequestError) else str(exc)
    return grpc.StatusCode[exc.grpc_status], message
