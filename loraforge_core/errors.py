"""Domain errors that the gRPC edge maps to status codes with ``google.rpc`` details.

Domain code raises these and knows nothing of gRPC; ``grpc_edge.CallInterceptor`` translates them.
Anything else that escapes a handler is our bug: INTERNAL with a correlation id, no traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ServiceError(Exception):
    """Base for errors a caller can act on. ``reason``, where set, names the rule that refused
    the call (UPPER_SNAKE_CASE); the status carries it as a ``google.rpc.ErrorInfo``."""

    reason = ""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class FieldViolation:
    field: str
    description: str


class InvalidArgument(ServiceError):
    """The request is malformed; ``violations`` say which fields and how to fix them."""

    def __init__(self, violations: list[FieldViolation] | str, field_name: str = "") -> None:
        if isinstance(violations, str):
            violations = [FieldViolation(field_name, violations)]
        self.violations = violations
        super().__init__(
            "; ".join(
                f"{v.field}: {v.description}" if v.field else v.description for v in violations
            )
        )


class NotFound(ServiceError):
    def __init__(self, resource_type: str, resource_name: str, hint: str = "") -> None:
        self.resource_type = resource_type
        self.resource_name = resource_name
        super().__init__(
            f"{resource_type} {resource_name!r} not found" + (f": {hint}" if hint else "")
        )


class FailedPrecondition(ServiceError):
    pass


class PermissionDenied(ServiceError):
    """The server's policy refuses what the call asks (not the caller's credentials)."""


class ResourceExhausted(ServiceError):
    def __init__(self, message: str, retry_after_seconds: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class Unavailable(ServiceError):
    pass


class Cancelled(ServiceError):
    pass


@dataclass
class Violations:
    """Collects field violations while validating a whole request, then raises them at once."""

    items: list[FieldViolation] = field(default_factory=list)

    def add(self, field_name: str, description: str) -> None:
        self.items.append(FieldViolation(field_name, description))

    def check(self, condition: bool, field_name: str, description: str) -> None:
        if not condition:
            self.add(field_name, description)

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)
