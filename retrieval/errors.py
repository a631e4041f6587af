"""Errors of the service, each carrying its gRPC status code.

    ServiceError                 INTERNAL unless a subclass says otherwise
    ├── InvalidArgument          INVALID_ARGUMENT: a request field is wrong; names the field
    ├── NotFound                 NOT_FOUND
    ├── FailedPrecondition       FAILED_PRECONDITION: no model/index pair loaded, or an
    │                            artifact refused (training.errors.ArtifactError)
    └── DeadlineExceeded         DEADLINE_EXCEEDED: the caller's deadline passed; the rest
                                 of the work is skipped
    (retrieval.feature_store.FeatureStoreUnavailable → UNAVAILABLE: the caller may retry.
     Only writes get there: a Retrieve whose feature read fails is answered degraded.)

``status_of`` is the one place any exception becomes a (code, message) pair; the server's
interceptor calls it. Anything that is not ours is INTERNAL with a fixed message: its
details go to the log, never to the caller.
"""

from __future__ import annotations

import grpc

from retrieval.feature_store import FeatureStoreUnavailable
from training.errors import ArtifactError


class ServiceError(Exception):
    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status to return for ``exc``; None when it is not ours (→ INTERNAL, logged)."""
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, FeatureStoreUnavailable):
        return grpc.StatusCode.UNAVAILABLE, "feature store unavailable"
    if isinstance(exc, ArtifactError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    return None
