"""The one table from domain errors to gRPC codes, pinned."""
from __future__ import annotations

import grpc
import pytest

from csi_virtvol import errors
from csi_virtvol.csi.status import TABLE, code_for

Code = grpc.StatusCode


@pytest.mark.parametrize("exc,code", [
    (errors.NotFound("x"), Code.NOT_FOUND),
    (errors.AlreadyExists("x"), Code.ALREADY_EXISTS),
    (errors.InvalidRequest("x"), Code.INVALID_ARGUMENT),
    (errors.OutOfRange("x"), Code.OUT_OF_RANGE),  # a subclass of InvalidRequest, mapped on its own
    (errors.UnsupportedCapability("x"), Code.INVALID_ARGUMENT),
    (errors.PreconditionFailed("x"), Code.FAILED_PRECONDITION),
    (errors.CapacityExceeded("x"), Code.RESOURCE_EXHAUSTED),
    (errors.OperationPending("x"), Code.ABORTED),
    (errors.Conflict("x"), Code.ABORTED),
    (errors.InvalidToken("x"), Code.ABORTED),
    (errors.BackendUnavailable("x"), Code.UNAVAILABLE),
    (errors.BackendError("x"), Code.INTERNAL),
    (RuntimeError("bug"), Code.INTERNAL),
])
def test_code_for(exc: BaseException, code: grpc.StatusCode) -> None:
    assert code_for(exc) is code


def test_every_domain_error_is_in_the_table() -> None:
    domain = {c for c in vars(errors).values()
              if isinstance(c, type) and issubclass(c, errors.VirtvolError) and c is not errors.VirtvolError}
    assert domain <= set(TABLE)


def test_a_subclass_maps_like_its_nearest_base() -> None:
    class Mine(errors.CapacityExceeded):
        pass

    assert code_for(Mine("x")) is Code.RESOURCE_EXHAUSTED
