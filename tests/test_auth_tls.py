"""Bearer-token auth and (mutual) TLS on a real server, with certificates made in the test."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from loraforge.v1 import generator_pb2, generator_pb2_grpc
from loraforge_client import TLS, GeneratorClient, UnauthenticatedError, UnavailableError

from loraforge_core.auth import token_matches
from loraforge_core.launch import ServerProcess
from tests.helpers import make_pki

TOKEN = "s3cret-token-for-tests-0001"
OTHER = "another-valid-token-000002"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_token_comparison_checks_every_token() -> None:
    assert token_matches(TOKEN, [OTHER, TOKEN])
    assert not token_matches(TOKEN[:-1], [TOKEN])
    assert not token_matches("", [TOKEN])


@pytest.mark.slow
def test_bearer_tokens_guard_every_method_but_health(tiny_model: Path, tmp_path: Path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# two tokens\n{TOKEN}\n{OTHER}\n")
    with ServerProcess(
        "generator",
        data_dir=tmp_path,
        model=str(tiny_model),
        extra_args=["--auth-token-file", str(tokens)],
    ) as server:
        with grpc.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = generator_pb2_grpc.GeneratorStub(channel)
            for metadata in ((), (("authorization", "Bearer wrong-token-xxxxxxxx"),)):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.ListAdapters(generator_pb2.ListAdaptersRequest(), metadata=metadata)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as caught:  # a streaming method too
                list(stub.GenerateStream(generator_pb2.GenerateRequest(prompt="x")))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for token in (TOKEN, OTHER):
            with GeneratorClient(server.target, token=token) as client:
                assert client.list_adapters() == []
        with (
            GeneratorClient(server.target, token="nope-nope-nope-nope") as client,
            pytest.raises(UnauthenticatedError),
        ):
            client.list_adapters()


@pytest.mark.slow
def test_mutual_tls(tiny_model: Path, tmp_path: Path, pki: dict[str, Path]):
    args = [
        "--tls-cert",
        str(pki["server.pem"]),
        "--tls-key",
        str(pki["server.key"]),
        "--tls-client-ca",
        str(pki["ca.pem"]),
    ]
    server = ServerProcess(
        "generator", data_dir=tmp_path, model=str(tiny_model), extra_args=args
    ).start()
    try:
        tls = TLS(
            root_certificates=pki["ca.pem"].read_bytes(),
            certificate_chain=pki["client.pem"].read_bytes(),
            private_key=pki["client.key"].read_bytes(),
        )
        with GeneratorClient(server.target, tls=tls, timeout=120) as client:
            # The client waits for readiness through retries; then the call works over mTLS.
            for _ in range(60):
                try:
                    adapters = client.list_adapters()
                    break
                except UnavailableError:
                    continue
            else:
                pytest.fail("no call succeeded over mutual TLS")
            assert adapters == []
        no_cert = TLS(root_certificates=pki["ca.pem"].read_bytes())
        with (
            GeneratorClient(server.target, tls=no_cert, retries=0) as client,
            pytest.raises(UnavailableError),
        ):
            client.list_adapters()
    finally:
        assert server.terminate() == 0


def test_bad_auth_settings_fail_at_start_with_a_clear_message(tmp_path: Path, tiny_model):
    short = tmp_path / "tokens"
    short.write_text("short\n")
    server = ServerProcess(
        "generator",
        data_dir=tmp_path,
        model=str(tiny_model),
        extra_args=["--auth-token-file", str(short)],
    ).start()
    assert server.process is not None and server.process.wait(60) == 2
    assert "at least 16 characters" in server.log()
