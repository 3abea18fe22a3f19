"""Bearer-token authentication and TLS credentials for the servers.

Tokens come from a file (one per line, ``#`` comments allowed), so a Kubernetes Secret can be
mounted as it is. Every call but health and reflection must carry ``authorization: Bearer T``;
a token is compared with every configured token in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def read_tokens(path: Path) -> list[str]:
    tokens = [line.strip() for line in Path(path).read_text().splitlines()]
    tokens = [t for t in tokens if t and not t.startswith("#")]
    if not tokens:
        raise ValueError(f"{path} holds no token")
    if any(len(t) < 16 for t in tokens):
        raise ValueError(f"{path}: tokens must be at least 16 characters")
    return tokens


def token_matches(presented: str, tokens: list[str]) -> bool:
    """Constant time in the presented token: every configured token is compared."""
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(presented.encode(), token.encode())
    return ok


def _bearer(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return ""


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        presented = _bearer(details.invocation_metadata)
        if presented and token_matches(presented, self.tokens):
            return handler
        message = (
            "missing bearer token: send 'authorization: Bearer <token>'"
            if not presented
            else "invalid bearer token"
        )

        async def deny_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - makes this an async generator

        factory, behaviour = (
            (grpc.unary_stream_rpc_method_handler, deny_stream) if handler.unary_stream
            else (grpc.unary_unary_rpc_method_handler, deny_unary)
        )  # fmt: skip
        return factory(
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS; with ``client_ca``, mutual TLS (clients must present a certificate it signed)."""
    return grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=Path(client_ca).read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )
