"""Adapter files fetched from where references point (references.py), under the operator's
policy, into a cache that later requests hit.

Each source has its real client: the model hub through ``huggingface_hub`` (its endpoint,
token, offline mode and cache are the operator's: ``HF_ENDPOINT``, ``HF_TOKEN``,
``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``), S3 through boto3 with the artifact store's endpoint and
keys, HTTPS through httpx2 (streamed, with timeouts, resumed with ``Range`` after a dropped
connection). Every fetch checks the policy first (sources on, hosts, buckets, addresses), reads
the safetensors header before the body, counts bytes against the size limit, and lands in the
cache only whole and verified (the pinned digest, the size the header declares). A refusal
names its rule (``ServiceError.reason``); requests for one reference share one download. What
a file must be, and how each refusal is worded, is fetch_checks.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from inference_service import metrics
from inference_service.fetch_checks import (
    bad_header,
    check_pin,
    declared_size,
    hub_refusal,
    matches,
    raise_for_status,
    read_header,
    refusal,
    safetensors_size,
    sha256_of,
)
from inference_service.references import Reference
from loraforge_core.errors import (
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    ServiceError,
    Unavailable,
)

log = logging.getLogger("loraforge.generator.fetching")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_REDIRECTS = 5
RESUME_ATTEMPTS = 3  # a dropped download resumes where it stopped, this many times in all


@dataclass
class FetchPolicy:
    """What an operator allows (inference_service/cli.py: the --adapter-* settings)."""

    sources: frozenset[str] = frozenset()  # the reference schemes that are on: hf https s3
    hosts: frozenset[str] = frozenset()  # https hosts allowed; empty: any public host
    buckets: frozenset[str] = frozenset()  # s3 buckets allowed beside the artifact store's
    networks: tuple[Network, ...] = ()  # non-public networks that may be fetched from
    max_bytes: int = 2 * 2**30
    timeout_s: float = 300.0  # a whole https download
    ca_file: str = ""  # trust for https: this CA bundle instead of the system's
    tokens: dict[str, str] = field(default_factory=dict)  # https host -> bearer token

    @staticmethod
    def parse_tokens(text: str) -> dict[str, str]:
        """``host=token[,host=token]`` (LORAFORGE_ADAPTER_TOKENS, from a Secret)."""
        pairs = (item.split("=", 1) for item in text.split(",") if item.strip())
        return {host.strip().lower(): token.strip() for host, token in pairs}


@dataclass(frozen=True)
class Fetched:
    path: Path
    sha256: str
    size: int


class RemoteAdapters:
    """Fetches references into ``cache_dir`` (the hub's files into the hub's own cache)."""

    def __init__(self, policy: FetchPolicy, cache_dir: Path, *, store_bucket: str = "") -> None:
        self.policy = policy
        self.cache_dir = Path(cache_dir)
        self.store_bucket = store_bucket  # the artifact store's bucket: s3 allows it
        self._lock = threading.Lock()
        self._inflight: dict[str, Future[Fetched]] = {}
        self._digests: dict[Path, str] = {}  # the hub's cached files, hashed once

    def fetch(self, ref: Reference, *, again: bool = False) -> Fetched:
        """The reference's file on this server's disk: from the cache, else downloaded once
        however many requests ask at the same time (they wait for the one download).
        ``again``: the caller fetched it moments ago (a cache hit then counts once)."""
        try:
            self._allow_source(ref)
        except ServiceError as err:
            _count_failure(ref, err)
            raise
        key = ref.pinned
        with self._lock:
            pending = self._inflight.get(key)
            if pending is None:
                self._inflight[key] = future = Future()
        if pending is not None:
            metrics.ADAPTER_FETCH_CACHE.labels(ref.scheme, "shared").inc()
            return pending.result()
        try:
            fetched = self._fetch(ref, count_hit=not again)
            future.set_result(fetched)
            return fetched
        except BaseException as err:
            _count_failure(ref, err)
            future.set_exception(err)
            raise
        finally:
            with self._lock:
                del self._inflight[key]

    def _fetch(self, ref: Reference, count_hit: bool) -> Fetched:
        if ref.scheme == "hf":
            return self._from_hub(ref, count_hit)
        cached = self._cached(ref)
        if cached is not None:
            if count_hit:
                metrics.ADAPTER_FETCH_CACHE.labels(ref.scheme, "hit").inc()
            return cached
        metrics.ADAPTER_FETCH_CACHE.labels(ref.scheme, "miss").inc()
        log.info("fetching adapter", extra={"reference": ref.text})
        started = time.perf_counter()
        partial = self.cache_dir / ".partial"
        partial.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=partial, suffix=".safetensors")
        os.close(fd)
        tmp = Path(name)
        try:
            self._download_https(ref, tmp) if ref.scheme == "https" else self._download_s3(ref, tmp)
            fetched = self._verified(ref, tmp)
            target = self._cache_path(ref)
            os.replace(tmp, target)  # the file whole and verified, then its record
            record = {"reference": ref.text, "sha256": fetched.sha256, "size": fetched.size}
            target.with_suffix(".json").write_text(json.dumps(record))
        finally:
            tmp.unlink(missing_ok=True)
        self._fetched(ref, fetched.size, time.perf_counter() - started)
        return Fetched(target, fetched.sha256, fetched.size)

    # ------------------------------------------------------------------ policy
    def _allow_source(self, ref: Reference) -> None:
        if ref.scheme not in self.policy.sources:
            raise refusal(
                PermissionDenied, "SOURCE_DISABLED",
                f"{ref.scheme}:// adapters are off on this server; its operator turns them on "
                "with --adapter-sources",
            )  # fmt: skip
        if ref.scheme == "s3" and ref.location not in self.policy.buckets | {self.store_bucket}:
            raise refusal(
                PermissionDenied, "BUCKET_NOT_ALLOWED",
                f"bucket {ref.location!r} is not in this server's --adapter-allow-buckets",
            )  # fmt: skip

    def _address(self, host: str, port: int) -> str:
        """The one address ``host`` is fetched from (resolved once: the connection goes to
        it), refused when it is not public and not in an allowed network."""
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            raise refusal(Unavailable, "UNRESOLVED", f"cannot resolve {host!r}: {err}") from None
        address = ipaddress.ip_address(found[0][4][0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        allowed = any(address in network for network in self.policy.networks)
        if not address.is_global and not allowed:
            kind = ("loopback" if address.is_loopback else "link-local" if
                    address.is_link_local else "private or reserved")  # fmt: skip
            raise refusal(
                PermissionDenied, "PRIVATE_ADDRESS",
                f"{host!r} resolves to {address}, a {kind} address; fetching from it needs "
                "its network in --adapter-allow-networks",
            )  # fmt: skip
        return str(address)

    # ------------------------------------------------------------------ https
    def _download_https(self, ref: Reference, dest: Path) -> None:
        """Stream the URL to ``dest``, following redirects (each hop checked), resuming with
        ``Range`` after a dropped connection."""
        import httpx2

        deadline = time.monotonic() + self.policy.timeout_s
        url, written, total, etag, failure = ref.url, 0, None, "", ""
        with self._http_client() as client, dest.open("wb") as out:
            for _ in range(RESUME_ATTEMPTS):
                resume = {"Range": f"bytes={written}-", **({"If-Range": etag} if etag else {})}
                try:
                    with self._open(client, url, resume if written else {}) as (response, url):
                        if written and response.status_code != 206:  # the whole file again
                            out.seek(0)
                            out.truncate()
                            written = 0
                        etag = response.headers.get("ETag", "")
                        declared = declared_size(response)
                        self._check_size(ref, declared)
                        head = None if written else b""  # the header: read from the start only
                        for chunk in response.iter_bytes():  # as each read arrives
                            written += len(chunk)
                            self._check_size(ref, written)
                            if time.monotonic() > deadline:
                                raise refusal(
                                    Unavailable, "TIMEOUT",
                                    f"{ref.text}: {written} bytes in {self.policy.timeout_s:g} "
                                    "s, the download limit (--adapter-fetch-timeout)",
                                )  # fmt: skip
                            if head is not None:
                                head += chunk
                                if (total := safetensors_size(head, ref)) is not None:
                                    matches(ref, total, declared)
                                    head = None
                            if total is not None and written > total:
                                raise bad_header(ref, f"it runs past the {total} bytes its "
                                                  "header declares")  # fmt: skip
                            out.write(chunk)
                    if total is not None and written == total:
                        return
                    failure = f"the server closed the file after {written} bytes"
                except (httpx2.TransportError, OSError) as err:
                    if isinstance(err, httpx2.TimeoutException) and time.monotonic() > deadline:
                        break
                    failure = f"{type(err).__name__}: {err}"
                out.flush()
        raise refusal(
            Unavailable, "INCOMPLETE",
            f"{ref.text}: the download stopped after {written} of "
            f"{total if total is not None else 'unknown'} bytes ({failure}), "
            f"{RESUME_ATTEMPTS} attempts",
        )  # fmt: skip

    def _http_client(self):
        import httpx2

        verify = ssl.create_default_context(cafile=self.policy.ca_file or None)
        read = min(30.0, self.policy.timeout_s)
        return httpx2.Client(
            verify=verify, trust_env=False, follow_redirects=False,
            timeout=httpx2.Timeout(read, connect=min(10.0, read)),
        )  # fmt: skip

    @contextlib.contextmanager
    def _open(self, client, url: str, headers: dict[str, str]) -> Iterator[tuple]:
        """The streamed response for ``url`` after its redirects, and the URL it came from."""
        for _ in range(MAX_REDIRECTS + 1):
            response = client.send(self._request(client, url, headers), stream=True)
            if not response.is_redirect:
                break
            response.close()
            url = urljoin(url, response.headers.get("Location", ""))
        else:
            raise refusal(
                FailedPrecondition, "TOO_MANY_REDIRECTS", f"more than {MAX_REDIRECTS} redirects"
            )
        try:
            raise_for_status(response.status_code, url)
            yield response, url
        finally:
            response.close()

    def _request(self, client, url: str, headers: dict[str, str]):
        """A GET for ``url`` sent to the address its host resolves to, if the policy allows
        it (the TLS name stays the host's: its certificate is checked against the name)."""
        parts = urlsplit(url)
        if parts.scheme != "https":
            raise refusal(
                PermissionDenied, "NOT_HTTPS", f"{url}: adapters are fetched over https only"
            )
        host, port = (parts.hostname or "").lower(), parts.port or 443
        if self.policy.hosts and host not in self.policy.hosts:
            raise refusal(
                PermissionDenied, "HOST_NOT_ALLOWED",
                f"{host!r} is not in this server's --adapter-allow-hosts",
            )  # fmt: skip
        address = self._address(host, port)
        netloc = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        headers = {**headers, "Host": parts.netloc, "Accept-Encoding": "identity"}
        if token := self.policy.tokens.get(host):
            headers["Authorization"] = f"Bearer {token}"  # to that host only, not a redirect's
        return client.build_request(
            "GET", parts._replace(netloc=netloc).geturl(), headers=headers,
            extensions={"sni_hostname": host},
        )  # fmt: skip

    # ------------------------------------------------------------------ s3
    def _download_s3(self, ref: Reference, dest: Path) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        from loraforge_core.objectstore import s3_client

        client = s3_client()

        def first_bytes(count: int) -> bytes:
            reply = client.get_object(
                Bucket=ref.location, Key=ref.path, Range=f"bytes=0-{count - 1}"
            )
            return reply["Body"].read()

        try:
            size = client.head_object(Bucket=ref.location, Key=ref.path)["ContentLength"]
            self._check_size(ref, size)
            read_header(ref, size, first_bytes)
            client.download_file(ref.location, ref.path, str(dest))
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
                raise NotFound("object", ref.text, "no such key in that bucket") from None
            if code in ("403", "AccessDenied"):
                denied = f"{ref.text}: the store denied access ({code})"
                raise refusal(PermissionDenied, "UPSTREAM_DENIED", denied) from None
            raise refusal(Unavailable, "UPSTREAM_ERROR", f"{ref.text}: {err}") from None
        except BotoCoreError as err:
            raise refusal(Unavailable, "UPSTREAM_ERROR", f"{ref.text}: {err}") from None

    # ------------------------------------------------------------------ the hub
    def _from_hub(self, ref: Reference, count_hit: bool) -> Fetched:
        """Through huggingface_hub and its cache: a cached file is a hit (offline too);
        otherwise the size and header are read before the download."""
        import huggingface_hub as hub
        from huggingface_hub import constants
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        revision = ref.revision or "main"
        cached = hub.try_to_load_from_cache(ref.location, ref.path, revision=revision)
        if isinstance(cached, str):
            if count_hit:
                metrics.ADAPTER_FETCH_CACHE.labels("hf", "hit").inc()
            return self._hub_file(ref, Path(cached))
        metrics.ADAPTER_FETCH_CACHE.labels("hf", "miss").inc()
        if constants.HF_HUB_OFFLINE:
            raise refusal(
                FailedPrecondition, "OFFLINE_NOT_CACHED",
                f"{ref.text} is not in the hub cache and HF_HUB_OFFLINE is set",
            )  # fmt: skip
        endpoint = urlsplit(constants.ENDPOINT)
        self._address(endpoint.hostname or "", endpoint.port or 443)
        log.info("fetching adapter", extra={"reference": ref.text})
        started = time.perf_counter()
        try:
            url = hub.hf_hub_url(ref.location, ref.path, revision=revision)
            size = hub.get_hf_file_metadata(url).size
            self._check_size(ref, size)

            def first_bytes(count: int) -> bytes:  # through the hub's own session and headers
                ranged = {**build_hf_headers(), "Range": f"bytes=0-{count - 1}"}
                reply = get_session().get(url, headers=ranged, timeout=60)
                hf_raise_for_status(reply)
                return reply.content[:count]

            read_header(ref, size, first_bytes)
            path = Path(hub.hf_hub_download(ref.location, ref.path, revision=revision))
        except ServiceError:
            raise
        except Exception as err:
            raise hub_refusal(ref, err) from None
        fetched = self._hub_file(ref, path)
        self._fetched(ref, fetched.size, time.perf_counter() - started)
        return fetched

    def _hub_file(self, ref: Reference, path: Path) -> Fetched:
        """A file in the hub's cache, checked against the pin; a mismatch leaves the cache
        without it."""
        if path not in self._digests:
            self._digests[path] = sha256_of(path)
        fetched = Fetched(path, self._digests[path], path.stat().st_size)
        try:
            check_pin(ref, fetched.sha256)
        except ServiceError:
            del self._digests[path]
            path.resolve().unlink(missing_ok=True)  # the blob, then its snapshot link
            path.unlink(missing_ok=True)
            raise
        return fetched

    # ------------------------------------------------------------------ the cache
    def _cache_path(self, ref: Reference) -> Path:
        return self.cache_dir / (
            hashlib.sha256(ref.text.encode()).hexdigest()[:32] + ".safetensors"
        )

    def _cached(self, ref: Reference) -> Fetched | None:
        path = self._cache_path(ref)
        try:
            record = json.loads(path.with_suffix(".json").read_text())
        except (OSError, ValueError):
            return None
        if not path.is_file() or ref.sha256 not in ("", record["sha256"]):
            return None  # pinned to other bytes than the cached ones: fetch them
        return Fetched(path, record["sha256"], record["size"])

    def _verified(self, ref: Reference, path: Path) -> Fetched:
        digest = sha256_of(path)
        check_pin(ref, digest)
        return Fetched(path, digest, path.stat().st_size)

    def _check_size(self, ref: Reference, size: int | None) -> None:
        if size is not None and size > self.policy.max_bytes:
            raise refusal(
                FailedPrecondition, "TOO_LARGE",
                f"{ref.text}: {size} bytes or more, over this server's "
                f"{self.policy.max_bytes} (--adapter-max-mb)",
            )  # fmt: skip

    def _fetched(self, ref: Reference, size: int, seconds: float) -> None:
        metrics.ADAPTER_FETCH_BYTES.labels(ref.scheme).inc(size)
        metrics.ADAPTER_FETCH_SECONDS.labels(ref.scheme).observe(seconds)
        log.info("adapter fetched", extra={"reference": ref.text, "bytes": size,
                                           "seconds": round(seconds, 3)})  # fmt: skip


def _count_failure(ref: Reference, err: BaseException) -> None:
    rule = getattr(err, "reason", "") or type(err).__name__
    metrics.ADAPTER_FETCH_FAILURES.labels(ref.scheme, rule).inc()
