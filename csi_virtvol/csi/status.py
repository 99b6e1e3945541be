"""The ONE table from domain errors to gRPC status codes."""
from __future__ import annotations

import grpc

from csi_virtvol import errors

TABLE: dict[type[BaseException], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UnsupportedCapability: grpc.StatusCode.INVALID_ARGUMENT,
    errors.PreconditionFailed: grpc.StatusCode.FAILED_PRECONDITION,
    errors.CapacityExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.OperationPending: grpc.StatusCode.ABORTED,
    errors.Conflict: grpc.StatusCode.ABORTED,
    errors.InvalidToken: grpc.StatusCode.ABORTED,
    errors.BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.BackendError: grpc.StatusCode.INTERNAL,
}


def code_for(exc: BaseException) -> grpc.StatusCode:
    """Walk the class's MRO so subclasses map like their nearest mapped base."""
    for cls in type(exc).__mro__:
        if cls in TABLE:
            return TABLE[cls]
    return grpc.StatusCode.INTERNAL
