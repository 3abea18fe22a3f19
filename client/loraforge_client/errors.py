"""Typed exceptions mapped from gRPC status codes, with the server's ``google.rpc`` details."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


@dataclass
class FieldViolation:
    field: str
    description: str


class LoraforgeError(Exception):
    """Base of every error the client raises for a failed call."""

    code: grpc.StatusCode | None = None
    request_id: str = ""  # the call's x-request-id, to find its lines in the servers' logs

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidArgumentError(LoraforgeError):
    """The request is malformed; ``field_violations`` say which fields and how to fix them."""

    field_violations: list[FieldViolation]


class NotFoundError(LoraforgeError):
    resource_type: str = ""
    resource_name: str = ""


class FailedPreconditionError(LoraforgeError):
    pass


class ResourceExhaustedError(LoraforgeError):
    retry_after: float | None = None


class UnavailableError(LoraforgeError):
    pass


class UnauthenticatedError(LoraforgeError):
    pass


class PermissionDeniedError(LoraforgeError):
    pass


class DeadlineExceededError(LoraforgeError):
    pass


class CancelledError(LoraforgeError):
    pass


class InternalError(LoraforgeError):
    pass


class JobFailedError(LoraforgeError):
    """``wait()`` on a job that ended FAILED or CANCELLED."""

    def __init__(self, message: str, job: object) -> None:
        super().__init__(message)
        self.job = job


_BY_CODE: dict[grpc.StatusCode, type[LoraforgeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ALREADY_EXISTS: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
}

# The metadata key of a call's request id, sent by the client and returned by the servers.
REQUEST_ID_HEADER = "x-request-id"
# Transient: a retry with backoff may succeed.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass
class _Details:
    violations: list[FieldViolation] = field(default_factory=list)
    resource_type: str = ""
    resource_name: str = ""
    retry_after: float | None = None


def _details(metadata: tuple | None) -> _Details:
    found = _Details()
    for key, value in metadata or ():
        if key != _DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            bad = error_details_pb2.BadRequest()
            info = error_details_pb2.ResourceInfo()
            retry = error_details_pb2.RetryInfo()
            if detail.Unpack(bad):
                found.violations += [
                    FieldViolation(v.field, v.description) for v in bad.field_violations
                ]
            elif detail.Unpack(info):
                found.resource_type, found.resource_name = info.resource_type, info.resource_name
            elif detail.Unpack(retry):
                found.retry_after = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    return found


def from_rpc_error(err: grpc.RpcError) -> LoraforgeError:
    """The typed exception for a failed call (sync ``RpcError`` or ``aio.AioRpcError``)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = (err.details() if hasattr(err, "details") else "") or str(code)
    trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    details = _details(trailing)
    cls = _BY_CODE.get(code, InternalError)
    error = cls(message, code=code)
    error.field_violations = details.violations  # type: ignore[attr-defined]
    error.request_id = next((v for k, v in trailing or () if k == REQUEST_ID_HEADER), "")
    if isinstance(error, NotFoundError):
        error.resource_type, error.resource_name = details.resource_type, details.resource_name
    if isinstance(error, ResourceExhaustedError):
        error.retry_after = details.retry_after
    return error


__all__ = [name for name in dir() if name.endswith("Error")] + [
    "RETRYABLE", "FieldViolation", "from_rpc_error",
]  # fmt: skip
