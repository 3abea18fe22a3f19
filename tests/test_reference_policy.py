"""Adapter references parsed and refused by rule before any byte moves (no server needed: each
refusal here happens before a connection); the fetches themselves are
test_adapter_references.py's, against real servers."""

from __future__ import annotations

import pytest
import torch
from loraforge.v1 import generator_pb2
from safetensors.torch import save

from inference_service.fetch_checks import safetensors_size
from inference_service.fetching import FetchPolicy, RemoteAdapters
from inference_service.proto_mapping import spec_from_request
from inference_service.references import adapter_id_for, parse_reference
from loraforge_core.errors import InvalidArgument, ServiceError


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("hf://Owner/Repo/lora.safetensors", "hf://Owner/Repo/lora.safetensors"),
        ("hf://o/r@v1.0/sub/lora.safetensors", "hf://o/r@v1.0/sub/lora.safetensors"),
        ("https://Example.ORG:8443/a/b?x=1", "https://example.org:8443/a/b?x=1"),
        ("s3://my-bucket/loras/a.safetensors", "s3://my-bucket/loras/a.safetensors"),
    ],
)
def test_references_parse_to_one_canonical_form(text: str, canonical: str) -> None:
    assert parse_reference(text).text == canonical
    pinned = parse_reference(f"{text}#sha256={'A' * 64}")
    assert pinned.sha256 == "a" * 64 and pinned.text == canonical
    assert adapter_id_for(pinned) != adapter_id_for(parse_reference(text))


@pytest.mark.parametrize(
    "text",
    [
        "ftp://host/a.safetensors", "hf://onlyrepo", "hf://o/r/../x.safetensors",
        "hf://o/r/model.bin", "https://user:pw@host/a", "s3://B/key", "s3://bucket/",
        "https://host/a#md5=00", "https://host:port/a",
    ],
)  # fmt: skip
def test_malformed_references_are_invalid_arguments_that_show_the_forms(text: str) -> None:
    request = generator_pb2.GenerateRequest(
        prompt="x", adapters=[generator_pb2.AdapterRef(source=text)]
    )
    with pytest.raises(InvalidArgument) as caught:
        spec_from_request(request)
    assert caught.value.violations[0].field == "adapters[0]"
    assert text in str(caught.value)


def refused_rule(remote: RemoteAdapters, text: str) -> str:
    with pytest.raises(ServiceError) as caught:
        remote.fetch(parse_reference(text))
    assert f"[{caught.value.reason}]" in caught.value.message
    return caught.value.reason


def test_each_policy_rule_refuses_before_a_connection(tmp_path) -> None:
    closed = RemoteAdapters(FetchPolicy(), tmp_path)
    for text in ("hf://o/r/a.safetensors", "https://example.org/a", "s3://b-1/a.safetensors"):
        assert refused_rule(closed, text) == "SOURCE_DISABLED"
    https = RemoteAdapters(FetchPolicy(sources=frozenset({"https", "s3"}),
                                       hosts=frozenset({"example.org"})), tmp_path,
                           store_bucket="store-bucket")  # fmt: skip
    assert refused_rule(https, "https://127.0.0.1:9/a") == "HOST_NOT_ALLOWED"
    assert refused_rule(https, "s3://other-bucket/a.safetensors") == "BUCKET_NOT_ALLOWED"
    anywhere = RemoteAdapters(FetchPolicy(sources=frozenset({"https"})), tmp_path)
    for private in ("127.0.0.1", "10.1.2.3", "169.254.169.254", "[::1]", "192.168.0.1"):
        assert refused_rule(anywhere, f"https://{private}:9/a") == "PRIVATE_ADDRESS"
    assert not list(tmp_path.rglob("*.safetensors"))


def test_a_safetensors_header_gives_the_file_size_or_a_refusal() -> None:
    data = save({"a": torch.zeros(3, 4), "b": torch.ones(5, dtype=torch.float16)})
    ref = parse_reference("https://example.org/a")
    assert safetensors_size(data, ref) == len(data)
    length = int.from_bytes(data[:8], "little")
    assert safetensors_size(data[: 8 + length - 1], ref) is None  # the header is not whole yet
    with pytest.raises(ServiceError, match="do not hold shape"):
        safetensors_size(data.replace(b"[3,4]", b"[3,5]"), ref)
    with pytest.raises(ServiceError, match="header of"):
        safetensors_size(b"<!DOCTYPE html>", ref)
