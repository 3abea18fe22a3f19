"""gRPC server plumbing shared by both services.

Health (NOT_SERVING until the service is warm), reflection, error mapping in one interceptor,
and graceful shutdown: on SIGTERM health flips to NOT_SERVING and in-flight calls get the grace
period to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from loraforge_core import errors
from loraforge_core.auth import AuthInterceptor, read_tokens, server_credentials
from loraforge_core.logs import REQUEST_ID, REQUEST_ID_HEADER, request_id_or_new
from loraforge_core.metrics import RPC_DURATION, RPC_STARTED, serve_metrics, split_method
from loraforge_core.settings import ServerSettings

log = logging.getLogger("loraforge.grpc")


class Servicer(Protocol):
    """A service's gRPC face: protobuf in, one domain call, protobuf out."""

    #: Fully qualified gRPC service names, for health and reflection.
    service_names: tuple[str, ...]

    def add_to(self, server: grpc.aio.Server) -> None: ...


class Service(Protocol):
    """The domain side of a loraforge service, whose life the shared server runner drives."""

    async def start(self) -> None:
        """Load models and open stores; the server reports SERVING once this returns."""

    async def drain(self) -> None:
        """Stop taking new work (queued work is refused) before the grace period starts."""

    async def close(self) -> None:
        """Release resources after the server stopped."""


# Status details travel in trailing metadata, which gRPC caps (8 KiB by default, the message
# and the base64 of the details together): echoes of hostile input are cut so that the client
# always receives the real status.
MAX_VIOLATIONS = 20
MAX_TEXT = 300
# grpc-status-details-bin carries the message and the details, in base64, and grpc-message
# the message again, percent-encoded (a non-ASCII byte takes three): about 6.3 KiB at most.
MAX_DETAILS_BYTES = 3000
DOMAIN = "loraforge.dev"  # ErrorInfo.domain: whose rules the reasons name
MAX_MESSAGE_BYTES = 1000


def _cut(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cut_message(text: str) -> str:
    """``text`` cut to MAX_MESSAGE_BYTES as grpc-message percent-encodes it."""
    used = 0
    for i, char in enumerate(text):
        used += sum(1 if 0x20 <= b < 0x7F and b != 0x25 else 3 for b in char.encode())
        if used > MAX_MESSAGE_BYTES - 3:
            return text[:i] + "..."
    return text


def _bad_request(violations: list[errors.FieldViolation]) -> error_details_pb2.BadRequest:
    """The first violations that fit in MAX_VIOLATIONS and MAX_DETAILS_BYTES."""
    detail = error_details_pb2.BadRequest()
    for v in violations[:MAX_VIOLATIONS]:
        detail.field_violations.add(field=_cut(v.field, 100), description=_cut(v.description))
        if detail.ByteSize() > MAX_DETAILS_BYTES:
            del detail.field_violations[-1]
            break
    return detail


def _status_for(err: errors.ServiceError) -> status_pb2.Status:
    detail = None
    if isinstance(err, errors.InvalidArgument):
        code = code_pb2.INVALID_ARGUMENT
        detail = _bad_request(err.violations)
    elif isinstance(err, errors.NotFound):
        code = code_pb2.NOT_FOUND
        detail = error_details_pb2.ResourceInfo(
            resource_type=err.resource_type, resource_name=_cut(err.resource_name, 200),
            description=_cut(err.message),
        )  # fmt: skip
    elif isinstance(err, errors.FailedPrecondition):
        code = code_pb2.FAILED_PRECONDITION
    elif isinstance(err, errors.ResourceExhausted):
        code = code_pb2.RESOURCE_EXHAUSTED
        seconds = max(err.retry_after_seconds, 0.0)
        detail = error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))
        )
    elif isinstance(err, errors.Unavailable):
        code = code_pb2.UNAVAILABLE
    elif isinstance(err, errors.PermissionDenied):
        code = code_pb2.PERMISSION_DENIED
    elif isinstance(err, errors.Cancelled):
        code = code_pb2.CANCELLED
    else:
        code = code_pb2.UNKNOWN
    status = status_pb2.Status(code=code, message=_cut_message(err.message))
    if detail is not None:
        status.details.add().Pack(detail)
    if err.reason:  # the rule that refused, for callers that branch on it
        status.details.add().Pack(error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN))
    return status


async def _abort(
    context: grpc.aio.ServicerContext, err: BaseException, method: str, request_id: str
) -> None:
    if isinstance(err, errors.ServiceError):
        status = _status_for(err)
    else:
        correlation_id = uuid.uuid4().hex[:12]
        log.error(
            "internal error",
            extra={"method": method, "correlation_id": correlation_id},
            exc_info=err,
        )
        status = status_pb2.Status(
            code=code_pb2.INTERNAL,
            message=f"internal error (correlation id {correlation_id}); it has been logged",
        )
    answer = rpc_status.to_status(status)
    await context.abort(
        answer.code, answer.details,
        trailing_metadata=(*answer.trailing_metadata, (REQUEST_ID_HEADER, request_id)),
    )  # fmt: skip


def _code_name(err: BaseException) -> str:
    """The status code name a call that raised ``err`` answers with."""
    if isinstance(err, errors.ServiceError):
        code = _status_for(err).code
        return next(c.name for c in grpc.StatusCode if c.value[0] == code)
    return "INTERNAL"


def _subjects(request: Any) -> dict[str, str]:
    """The ids a request names (its job, artifact or adapters), for its log line."""
    found = {name: value for name in ("job_id", "artifact_id", "adapter_id")
             if isinstance(value := getattr(request, name, ""), str) and value}  # fmt: skip
    adapters = getattr(request, "adapters", None)
    if adapters:
        found["adapter_ids"] = ",".join(a.adapter_id for a in adapters)
    return found


QUIET_SERVICES = ("Health", "ServerReflection")  # probes: their lines at debug level


@contextlib.asynccontextmanager
async def _observed(
    context: grpc.aio.ServicerContext, method: str, request_id: str, request: Any
) -> AsyncIterator[None]:
    """One call: its request id in every log line it causes and in its trailers, its
    duration by status code, a domain error turned into its status, and one line when it
    finishes (rpc, code, seconds and the ids it names; probes' at debug level)."""
    service, rpc = split_method(method)
    token = REQUEST_ID.set(request_id)
    context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
    RPC_STARTED.labels(service, rpc).inc()
    started = time.perf_counter()
    code = "OK"
    try:
        yield
    except asyncio.CancelledError:
        code = "CANCELLED"
        raise
    except grpc.aio.AbortError:
        code = context.code().name if context.code() is not None else "UNKNOWN"
        raise
    except Exception as err:
        code = _code_name(err)
        await _abort(context, err, method, request_id)
    finally:
        seconds = time.perf_counter() - started
        RPC_DURATION.labels(service, rpc, code).observe(seconds)
        level = logging.DEBUG if service in QUIET_SERVICES else logging.INFO
        log.log(level, "call finished", extra={
            "rpc": rpc, "code": code, "seconds": round(seconds, 4), **_subjects(request),
        })  # fmt: skip
        with contextlib.suppress(ValueError):  # a stream may end in another context
            REQUEST_ID.reset(token)


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Per call: request id, metrics and error mapping (``_observed``)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        sent = dict(handler_call_details.invocation_metadata or ()).get(REQUEST_ID_HEADER)
        request_id = request_id_or_new(sent if isinstance(sent, str) else None)
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with _observed(context, method, request_id, request):
                    return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                async with _observed(context, method, request_id, request):
                    async for item in inner_stream(request, context):
                        yield item

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def server_options(settings: ServerSettings) -> list[tuple[str, Any]]:
    limit = settings.max_message_mb * 1024 * 1024
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


async def _set_health(
    servicer: health.aio.HealthServicer, names: tuple[str, ...], status: int
) -> None:
    for name in ("", *names):
        await servicer.set(name, status)


async def serve(
    service: Service,
    servicer: Servicer,
    settings: ServerSettings,
    interceptors: list[grpc.aio.ServerInterceptor] | None = None,
) -> int:
    """Run a service until SIGTERM/SIGINT; return the process exit code."""
    interceptors = list(interceptors or [])
    if settings.auth_token_file is not None:
        interceptors.append(AuthInterceptor(read_tokens(settings.auth_token_file)))
    server = grpc.aio.server(
        interceptors=[*interceptors, CallInterceptor()],
        options=server_options(settings),
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    servicer.add_to(server)
    names = servicer.service_names
    reflection.enable_server_reflection(
        (*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert is not None and settings.tls_key is not None:
        credentials = server_credentials(
            settings.tls_cert, settings.tls_key, settings.tls_client_ca
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    await _set_health(health_servicer, names, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    serve_metrics(settings.metrics_port, settings.metrics_host or settings.host)
    log.info(
        "listening",
        extra={
            "address": address,
            "port": port,
            "tls": settings.tls_cert is not None,
            "auth": settings.auth_token_file is not None,
        },
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async def warm_up() -> None:
        await service.start()
        await _set_health(health_servicer, names, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"port": port})

    warm = asyncio.create_task(warm_up())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({warm, stopper}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if warm.done() and warm.exception() is not None:
        problem = warm.exception()
        if isinstance(problem, errors.ServiceError):  # the operator's to fix: the message says how
            log.error("start-up failed: %s", problem.message)
        else:
            log.error("start-up failed", exc_info=problem)
        exit_code = 1
    else:
        await stopper
    warm.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await warm

    log.info("shutting down", extra={"grace_period_s": settings.grace_period})
    await _set_health(health_servicer, names, health_pb2.HealthCheckResponse.NOT_SERVING)
    await service.drain()
    await server.stop(settings.grace_period)
    await service.close()
    log.info("stopped")
    return exit_code
