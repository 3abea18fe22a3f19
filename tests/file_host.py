"""A real HTTP(S) server on loopback that serves adapter files the way the internet does, well
and badly, and answers the model hub's file routes; it counts what it was asked.

Paths: ``/f/NAME`` (the file, with ETag and Range), ``/slow/NAME`` (a byte at a time),
``/cut/NAME`` (half the file, then the connection closes, every time), ``/once-cut/NAME``
(cut the first time, whole or by Range after), ``/huge/NAME`` (claims 64 GiB),
``/private/NAME`` (only with the bearer token), ``/to/KEY`` (a redirect to
``redirects[KEY]``), and the hub's ``/OWNER/REPO/resolve/REVISION/FILE`` (HEAD and GET, with
the headers huggingface_hub reads) for files in ``repos["OWNER/REPO"]``.
"""

from __future__ import annotations

import hashlib
import re
import ssl
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class FileHost:
    """``files`` by name, ``repos`` (hub repo id -> {file: bytes}), ``redirects`` by key;
    ``hits[path]`` counts GETs, ``ranges`` lists the Range headers received."""

    def __init__(self, *, tls: dict[str, Path] | None = None, token: str = "") -> None:
        self.files: dict[str, bytes] = {}
        self.repos: dict[str, dict[str, bytes]] = {}
        self.redirects: dict[str, str] = {}
        self.hits: Counter[str] = Counter()
        self.ranges: list[str] = []
        self.token = token
        self.closing = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(tls["server.pem"], tls["server.key"])
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FileHost:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()  # slow responses stop trickling
        self.server.shutdown()
        self.server.server_close()


def _handler(host: FileHost) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            host.hits[self.path] += 1
            if self.headers.get("Range"):
                host.ranges.append(f"{self.path} {self.headers['Range']}")
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            kind, _, name = self.path.lstrip("/").partition("/")
            if match := _RESOLVE.match(self.path):
                repo, _, filename = match.groups()
                data = host.repos.get(repo, {}).get(filename)
                return self._file(data, body, hub=True)
            if kind == "to" and name in host.redirects:
                self.send_response(302)
                self.send_header("Location", host.redirects[name])
                self.send_header("Content-Length", "0")
                return self.end_headers()
            data = host.files.get(name)
            if kind == "private" and self.headers.get("Authorization") != f"Bearer {host.token}":
                return self._status(401)
            if data is None or kind not in ("f", "private", "slow", "cut", "once-cut", "huge"):
                return self._status(404)
            if kind == "huge":
                self.send_response(200)
                self.send_header("Content-Length", str(64 * 2**30))
                self.end_headers()
                return self.wfile.write(data[:1024]) if body else None
            if kind == "slow":
                return self._trickle(data)
            cut = kind == "cut" or (kind == "once-cut" and host.hits[self.path] == 1)
            return self._file(data, body, cut=cut and body)

        def _status(self, code: int) -> None:
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _file(self, data: bytes | None, body: bool, *, hub: bool = False, cut: bool = False):
            if data is None:
                return self._status(404)
            start, status = 0, 200
            if (asked := self.headers.get("Range")) and not cut:
                first, _, last = asked.removeprefix("bytes=").partition("-")
                start, end = int(first), min(int(last or len(data) - 1), len(data) - 1)
                status, part = 206, data[start : end + 1]
            else:
                part = data
            self.send_response(status)
            self.send_header("Content-Length", str(len(part)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            if status == 206:
                self.send_header(
                    "Content-Range", f"bytes {start}-{start + len(part) - 1}/{len(data)}"
                )
            if hub:
                self.send_header("X-Repo-Commit", COMMIT)
            self.end_headers()
            if body:
                self.wfile.write(part[: len(part) // 2] if cut else part)
            if cut:
                self.close_connection = True

        def _trickle(self, data: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            for i in range(len(data)):
                if host.closing.is_set():
                    return
                try:
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                except OSError:  # the client gave up
                    return
                time.sleep(0.05)  # a slow server: this is its behaviour, not a wait in a test

    return Handler
