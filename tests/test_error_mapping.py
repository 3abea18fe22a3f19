"""Domain errors -> gRPC status with details (server edge) -> typed client errors."""

from __future__ import annotations

import base64
import urllib.parse

import grpc
import pytest
from loraforge_client import errors as client_errors
from loraforge_client.errors import from_rpc_error

from loraforge_core import errors
from loraforge_core.grpc_edge import MAX_VIOLATIONS, _status_for


def received(err: errors.ServiceError) -> client_errors.LoraforgeError:
    """What a client raises for ``err``: the status travels as gRPC sends it, in trailers."""
    status = _status_for(err)
    rpc_error = grpc.aio.AioRpcError(
        grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == status.code)),
        initial_metadata=grpc.aio.Metadata(),
        trailing_metadata=grpc.aio.Metadata(
            ("grpc-status-details-bin", status.SerializeToString())
        ),
        details=status.message,
    )
    return from_rpc_error(rpc_error)


def test_invalid_argument_carries_each_field_violation() -> None:
    error = received(
        errors.InvalidArgument(
            [errors.FieldViolation("width", "a multiple of 8"), errors.FieldViolation("seed", "")]
        )
    )
    assert isinstance(error, client_errors.InvalidArgumentError)
    assert [(v.field, v.description) for v in error.field_violations] == [
        ("width", "a multiple of 8"),
        ("seed", ""),
    ]


def test_not_found_names_the_resource() -> None:
    error = received(errors.NotFound("adapter", "my-dog", "load it first"))
    assert isinstance(error, client_errors.NotFoundError)
    assert (error.resource_type, error.resource_name) == ("adapter", "my-dog")
    assert "load it first" in str(error)


def test_resource_exhausted_says_when_to_retry() -> None:
    error = received(errors.ResourceExhausted("queue full", retry_after_seconds=2.5))
    assert isinstance(error, client_errors.ResourceExhaustedError)
    assert error.retry_after == pytest.approx(2.5)


@pytest.mark.parametrize(
    ("domain", "typed"),
    [
        (errors.FailedPrecondition("pinned"), client_errors.FailedPreconditionError),
        (errors.Unavailable("warming up"), client_errors.UnavailableError),
        (errors.Cancelled("gone"), client_errors.CancelledError),
    ],
)
def test_other_errors_map_to_their_codes(domain, typed) -> None:
    assert type(received(domain)) is typed


def test_hostile_echoes_are_cut_in_number_and_length() -> None:
    many = [errors.FieldViolation("f" * 10_000, "d" * 10_000) for _ in range(100)]
    violations = received(errors.InvalidArgument(many)).field_violations
    assert 0 < len(violations) <= MAX_VIOLATIONS
    assert all(len(v.field) <= 100 and len(v.description) <= 300 for v in violations)
    few = [errors.FieldViolation(f"f{i}", "short") for i in range(100)]
    assert len(received(errors.InvalidArgument(few)).field_violations) == MAX_VIOLATIONS


def test_the_whole_status_fits_in_grpcs_trailing_metadata() -> None:
    long = [errors.FieldViolation("f" * 10_000, "d" * 10_000) for _ in range(100)]
    for text in ("d" * 10_000, "😀" * 10_000):  # grpc-message percent-encodes non-ASCII
        long = [errors.FieldViolation("f" * 10_000, text) for _ in range(100)]
        status = _status_for(errors.InvalidArgument(long))  # the message joins them all
        message = urllib.parse.quote(status.message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")
        encoded = len(base64.b64encode(status.SerializeToString())) + len(message)
        assert encoded < 8 * 1024 and status.message.endswith("...")
