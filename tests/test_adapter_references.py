"""Adapters named where users keep them: https URLs, model hub files and S3 objects, fetched by
a real generator under its policy. Real servers on loopback: an HTTPS file host with a CA made
here (tests/file_host.py), the hub's file routes answered to the real huggingface_hub client,
SeaweedFS for S3. Every hostile answer ends in a refusal that names its rule, with nothing
left in the cache and the server still serving."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from loraforge.v1 import generator_pb2, generator_pb2_grpc
from loraforge_client import GeneratorClient
from loraforge_client.types import AdapterRef

from inference_service.references import adapter_id_for, parse_reference
from loraforge_core.launch import ServerProcess, free_port
from tests.file_host import FileHost
from tests.helpers import make_pki
from tests.test_cold_adapters import wait_for_line
from trainer_service.training.lora import random_lora_bundle

pytestmark = pytest.mark.slow

TOKEN = "adapter-host-token"
SCALES = {"https": 0.7, "hf": 1.0, "s3": 0.6}


def lora_file(model: Path, folder: Path, seed: int) -> bytes:
    bundle = random_lora_bundle(str(model), folder / f"b{seed}", seed=seed, rank=4)
    return Path(bundle.lora_path).read_bytes()


@pytest.fixture(scope="module")
def world(tiny_model: Path, tmp_path_factory, s3_server):
    """The file host (https), the hub (http, its endpoint being the operator's), the S3
    bucket, three LoRA files, and a generator that may fetch from all of them."""
    import boto3

    root = tmp_path_factory.mktemp("references")
    pki = make_pki(root)
    files = {name: lora_file(tiny_model, root, seed) for seed, name in enumerate(
        ("web", "hub", "bucket", "eight", "spare"), start=1)}  # fmt: skip
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                      aws_access_key_id=s3_server.access_key,
                      aws_secret_access_key=s3_server.secret_key)  # fmt: skip
    s3.put_object(Bucket=s3_server.bucket, Key="loras/bucket.safetensors", Body=files["bucket"])
    with FileHost(tls=pki, token=TOKEN) as web, FileHost() as hub:
        web.files.update(files)
        web.files["page"] = b"<!DOCTYPE html><html>not a LoRA</html>" * 10
        hub.repos["someone/tiny-lora"] = {"lora.safetensors": files["hub"],
                                          "other.safetensors": files["spare"]}  # fmt: skip
        metrics_port = free_port()
        env = {**s3_server.env, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
               "HF_HUB_CACHE": str(root / "hub-cache"),
               "LORAFORGE_ADAPTER_TOKENS": f"127.0.0.1={TOKEN}"}  # fmt: skip
        generator = ServerProcess(
            "generator", data_dir=root / "g", model=str(tiny_model), env=env,
            extra_args=["--metrics-port", str(metrics_port), "--adapter-sources", "hf,https,s3",
                        "--adapter-allow-networks", "127.0.0.1/32",
                        "--adapter-allow-buckets", s3_server.bucket,
                        "--adapter-ca-file", str(pki["ca.pem"]), "--adapter-max-mb", "1",
                        "--adapter-fetch-timeout", "3"],
        )  # fmt: skip
        with generator, grpc.insecure_channel(generator.target) as channel:
            yield {
                "web": web, "hub": hub, "files": files, "bucket": s3_server.bucket, "s3": s3,
                "stub": generator_pb2_grpc.GeneratorStub(channel), "root": root,
                "generator": generator, "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
                "env": env, "model": tiny_model, "target": generator.target,
            }  # fmt: skip


def render(stub, *adapters: generator_pb2.AdapterRef) -> bytes:
    request = generator_pb2.GenerateRequest(
        prompt="a red circle", width=32, height=32, num_inference_steps=2, seed=7,
        adapters=list(adapters),
    )  # fmt: skip
    return stub.Generate(request, timeout=120).images[0].data


def refusal(call) -> tuple[grpc.StatusCode, str, str]:
    """A failed call's code, message and the rule its ErrorInfo names."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    status = rpc_status.from_call(caught.value) or status_pb2.Status()
    reasons = [error_details_pb2.ErrorInfo.FromString(d.value).reason for d in status.details
               if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]  # fmt: skip
    return caught.value.code(), caught.value.details(), (reasons or [""])[0]


def cached_files(world) -> list[Path]:
    """The generator's cached adapter files, and the hub cache's (its files and their
    snapshot links; not its refs and locks, which name no bytes)."""
    cache = world["root"] / "g" / "adapter-cache"
    hub = world["root"] / "hub-cache"
    return sorted(p for folder in (cache, hub) if folder.exists() for p in folder.rglob("*")
                  if p.is_file() and not {".locks", "refs"} & set(p.parts))  # fmt: skip


def test_three_sources_at_their_own_scales_render_what_the_same_files_loaded_by_hand_render(
    world,
) -> None:
    stub, files = world["stub"], world["files"]
    sources = {
        "https": f"{world['web'].url}/f/web",
        "hf": "hf://someone/tiny-lora/lora.safetensors",
        "s3": f"s3://{world['bucket']}/loras/bucket.safetensors",
    }
    by_reference = render(stub, *(generator_pb2.AdapterRef(source=sources[k], scale=s)
                                  for k, s in SCALES.items()))  # fmt: skip
    for name, key in (("by-hand-web", "web"), ("by-hand-hub", "hub"), ("by-hand-s3", "bucket")):
        stub.LoadAdapter(generator_pb2.LoadAdapterRequest(adapter_id=name, data=files[key]))
    by_hand = render(
        stub,
        *(
            generator_pb2.AdapterRef(adapter_id=name, scale=s)
            for name, s in zip(
                ("by-hand-web", "by-hand-hub", "by-hand-s3"), SCALES.values(), strict=True
            )
        ),
    )
    assert by_reference == by_hand
    assert by_reference != render(stub)  # the adapters change the image

    listed = {
        a.adapter_id: a for a in stub.ListAdapters(generator_pb2.ListAdaptersRequest()).adapters
    }
    for scheme, key in (("https", "web"), ("hf", "hub"), ("s3", "bucket")):
        info = listed[adapter_id_for(parse_reference(sources[scheme]))]
        assert info.source == parse_reference(sources[scheme]).text
        assert info.source_sha256 == hashlib.sha256(files[key]).hexdigest()
    assert listed["by-hand-web"].source == "upload"

    # A later request after an unload hits the cache: no new download from any source.
    hits = (world["web"].hits.copy(), world["hub"].hits.copy())
    for source in sources.values():
        stub.UnloadAdapter(generator_pb2.UnloadAdapterRequest(
            adapter_id=adapter_id_for(parse_reference(source))))  # fmt: skip
    again = render(stub, *(generator_pb2.AdapterRef(source=sources[k], scale=s)
                           for k, s in SCALES.items()))  # fmt: skip
    assert again == by_reference
    assert (world["web"].hits, world["hub"].hits) == hits
    with urllib.request.urlopen(world["metrics"], timeout=10) as scrape:
        text = scrape.read().decode()
    for scheme in ("https", "hf", "s3"):
        assert f'adapter_fetch_cache_total{{result="hit",source="{scheme}"}} 1.0' in text, text
        assert f'adapter_fetch_bytes_total{{source="{scheme}"}}' in text


def test_eight_concurrent_requests_for_one_cold_url_make_one_download(world) -> None:
    url = f"{world['web'].url}/f/eight"
    ref = generator_pb2.AdapterRef(source=url, scale=0.8)
    with ThreadPoolExecutor(8) as pool:
        images = list(pool.map(lambda _: render(world["stub"], ref), range(8)))
    assert len(set(images)) == 1
    assert world["web"].hits["/f/eight"] == 1


def test_a_request_waits_for_its_cold_adapter_while_others_render(world, s3_server) -> None:
    """Its download hangs on a frozen S3 server; other requests and ListAdapters go on."""
    world["s3"].put_object(Bucket=world["bucket"], Key="cold.safetensors",
                           Body=world["files"]["spare"])  # fmt: skip
    source = f"s3://{world['bucket']}/cold.safetensors"
    os.kill(s3_server.process.pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as pool:
            cold = pool.submit(render, world["stub"], generator_pb2.AdapterRef(source=source))
            # Its download began: "fetching adapter" names it (the log's JSON extras).
            wait_for_line(world["generator"], f'"reference": "{source}"')
            assert render(world["stub"]).startswith(b"\x89PNG")
            listed = world["stub"].ListAdapters(generator_pb2.ListAdaptersRequest(), timeout=10)
            ids = {a.adapter_id for a in listed.adapters}
            assert adapter_id_for(parse_reference(source)) not in ids
            assert not cold.done()
            os.kill(s3_server.process.pid, signal.SIGCONT)
            assert cold.result().startswith(b"\x89PNG")
    finally:
        os.kill(s3_server.process.pid, signal.SIGCONT)


def test_a_dropped_download_resumes_where_it_stopped(world) -> None:
    info = world["stub"].LoadAdapter(generator_pb2.LoadAdapterRequest(
        uri=f"{world['web'].url}/once-cut/spare"))  # fmt: skip
    assert info.source_sha256 == hashlib.sha256(world["files"]["spare"]).hexdigest()
    assert world["web"].hits["/once-cut/spare"] == 2
    half = len(world["files"]["spare"]) // 2
    assert world["web"].ranges == [f"/once-cut/spare bytes={half}-"]


def test_a_bearer_token_is_sent_to_its_host(world) -> None:
    info = world["stub"].LoadAdapter(generator_pb2.LoadAdapterRequest(
        adapter_id="private", uri=f"{world['web'].url}/private/web"))  # fmt: skip
    assert info.source_sha256 == hashlib.sha256(world["files"]["web"]).hexdigest()


HOSTILE = {
    # case: (path or reference, code, rule)
    "slow": ("/slow/web", grpc.StatusCode.UNAVAILABLE, "TIMEOUT"),
    "truncated": ("/cut/web", grpc.StatusCode.UNAVAILABLE, "INCOMPLETE"),
    "oversized": ("/huge/web", grpc.StatusCode.FAILED_PRECONDITION, "TOO_LARGE"),
    "not safetensors": ("/f/page", grpc.StatusCode.FAILED_PRECONDITION, "NOT_SAFETENSORS"),
    "wrong digest": ("/f/web#sha256=" + "0" * 64, grpc.StatusCode.FAILED_PRECONDITION,
                     "SHA256_MISMATCH"),
    "redirect to link-local": ("/to/metadata", grpc.StatusCode.PERMISSION_DENIED,
                               "PRIVATE_ADDRESS"),
    "redirect to another loopback": ("/to/loopback", grpc.StatusCode.PERMISSION_DENIED,
                                     "PRIVATE_ADDRESS"),
    "redirect to plain http": ("/to/http", grpc.StatusCode.PERMISSION_DENIED, "NOT_HTTPS"),
    "hub wrong digest": ("hf://someone/tiny-lora/other.safetensors#sha256=" + "1" * 64,
                         grpc.StatusCode.FAILED_PRECONDITION, "SHA256_MISMATCH"),
    "bucket not allowed": ("s3://another-bucket/loras/bucket.safetensors",
                           grpc.StatusCode.PERMISSION_DENIED, "BUCKET_NOT_ALLOWED"),
}  # fmt: skip


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_answers_are_refused_by_their_rule_leaving_nothing_cached(world, case) -> None:
    web = world["web"]
    web.redirects.update(metadata="https://169.254.169.254/latest/meta-data",
                         loopback=f"https://127.0.0.2:{web.url.rsplit(':', 1)[1]}/f/web",
                         http=web.url.replace("https://", "http://") + "/f/web")  # fmt: skip
    where, code, rule = HOSTILE[case]
    source = web.url + where if where.startswith("/") else where
    before = cached_files(world)
    got = refusal(lambda: render(world["stub"], generator_pb2.AdapterRef(source=source)))
    assert got[0] == code and got[2] == rule, got
    assert f"[{rule}]" in got[1]
    assert cached_files(world) == before
    assert not list((world["root"] / "g" / "adapter-cache" / ".partial").glob("*"))
    assert render(world["stub"]).startswith(b"\x89PNG")  # still serving
    with urllib.request.urlopen(world["metrics"], timeout=10) as scrape:
        counted = f'failures_total{{rule="{rule}",source="{source.split(":")[0]}"}}'
        assert counted in scrape.read().decode()


def test_the_client_and_cli_name_adapters_by_reference(world, tmp_path: Path) -> None:
    url = f"{world['web'].url}/f/web"
    assert AdapterRef.parse(f"{url}:0.7") == AdapterRef("", 0.7, source=url)
    assert AdapterRef.parse("hf://someone/tiny-lora/lora.safetensors:1:0.5x") == AdapterRef(
        "", 1.0, 0.5, True, source="hf://someone/tiny-lora/lora.safetensors"
    )
    expected = render(world["stub"], generator_pb2.AdapterRef(source=url, scale=0.7))
    with GeneratorClient(world["target"]) as client:
        image = client.generate("a red circle", adapters=[AdapterRef.parse(f"{url}:0.7")],
                                width=32, height=32, steps=2, seed=7)[0]  # fmt: skip
    assert image.data == expected
    env = {**os.environ, "LORAFORGE_GENERATOR": world["target"]}
    loraforge = [sys.executable, "-m", "loraforge_client.cli"]
    made = subprocess.run(
        [*loraforge, "generate", "a red circle", "--lora", f"{url}:0.7", "--width", "32",
         "--height", "32", "--steps", "2", "--seed", "7", "-o", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    )  # fmt: skip
    assert Path(made.stdout.split()[0]).read_bytes() == expected
    spare = f"{world['web'].url}/f/spare"
    loaded = subprocess.run([*loraforge, "adapters", "load", "", spare], capture_output=True,
                            text=True, env=env, timeout=60, check=True).stdout  # fmt: skip
    assert loaded.startswith(adapter_id_for(parse_reference(spare))) and f"from {spare}" in loaded
    listed = subprocess.run([*loraforge, "adapters", "ls"], capture_output=True, text=True,
                            env=env, timeout=60, check=True).stdout  # fmt: skip
    assert parse_reference(url).text in listed and spare in listed


def test_a_pre_seeded_hub_cache_serves_offline(world, tmp_path: Path) -> None:
    """An operator fills the hub cache ahead (here: the first generator's downloads) and runs
    offline: cached files load with no request to the hub; others are refused by name."""
    stub = world["stub"]
    stub.LoadAdapter(
        generator_pb2.LoadAdapterRequest(uri="hf://someone/tiny-lora/lora.safetensors")
    )
    hits = world["hub"].hits.copy()
    env = {**world["env"], "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    offline = ServerProcess(
        "generator", data_dir=tmp_path / "g", model=str(world["model"]), env=env,
        extra_args=["--adapter-sources", "hf"],
    )  # fmt: skip
    with offline, grpc.insecure_channel(offline.target) as channel:
        stub = generator_pb2_grpc.GeneratorStub(channel)
        info = stub.LoadAdapter(generator_pb2.LoadAdapterRequest(
            uri="hf://someone/tiny-lora/lora.safetensors"))  # fmt: skip
        assert info.source_sha256 == hashlib.sha256(world["files"]["hub"]).hexdigest()
        code, _, rule = refusal(lambda: stub.LoadAdapter(generator_pb2.LoadAdapterRequest(
            uri="hf://someone/tiny-lora@v2/lora.safetensors")))  # fmt: skip
        assert (code, rule) == (grpc.StatusCode.FAILED_PRECONDITION, "OFFLINE_NOT_CACHED")
        code, _, rule = refusal(lambda: stub.LoadAdapter(generator_pb2.LoadAdapterRequest(
            uri=f"{world['web'].url}/f/web")))  # fmt: skip
        assert (code, rule) == (grpc.StatusCode.PERMISSION_DENIED, "SOURCE_DISABLED")
    assert world["hub"].hits == hits
