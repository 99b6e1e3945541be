"""The domain error hierarchy.  Nothing here knows about gRPC: csi/status.py
maps these classes onto status codes, in one table."""
from __future__ import annotations


class VirtvolError(Exception):
    """Base of every error the driver raises on purpose."""


class NotFound(VirtvolError):
    """The named object does not exist."""


class AlreadyExists(VirtvolError):
    """An object of that name exists with a different specification."""


class InvalidRequest(VirtvolError):
    """The request is malformed: a missing field, an unknown parameter, ..."""


class OutOfRange(InvalidRequest):
    """A size or count is outside what the driver accepts."""


class UnsupportedCapability(VirtvolError):
    """The request asks for something this driver or array cannot do."""


class PreconditionFailed(VirtvolError):
    """The object is in a state that forbids the operation (in use, copying, ...)."""


class CapacityExceeded(VirtvolError):
    """Not enough free space on the eligible arrays."""


class OperationPending(VirtvolError):
    """Another operation on the same object is in flight; try again later."""


class Conflict(VirtvolError):
    """An optimistic-concurrency write lost: the record changed underneath."""


class BackendUnavailable(VirtvolError):
    """An array or daemon could not be reached."""


class BackendError(VirtvolError):
    """An array or host tool failed; the message says which and how."""


class InvalidToken(VirtvolError):
    """A pagination token the driver did not issue (CSI answers ABORTED)."""
