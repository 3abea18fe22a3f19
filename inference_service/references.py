"""Adapter references: where a user keeps an adapter, named in a request.

``hf://owner/repo[@revision]/path/file.safetensors`` (a model hub file), ``https://host/path``
(any URL that serves a LoRA safetensors file) or ``s3://bucket/key``; ``#sha256=<64 hex>``
after any of them pins the bytes. A reference names one file, in any format interop reads.
The server that fetches it (fetching.py) registers it under ``adapter_id_for(reference)``
unless the request names it, so every request for one reference shares one adapter.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from loraforge_core.errors import InvalidArgument

SCHEMES = ("hf", "https", "s3")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")  # the hub's repo names
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
FORMS = "hf://OWNER/REPO[@REVISION]/FILE.safetensors, https://HOST/PATH or s3://BUCKET/KEY"


@dataclass(frozen=True)
class Reference:
    """A parsed reference; ``text`` is its canonical form without the pin."""

    scheme: str  # hf | https | s3
    location: str  # the hub repo id, the URL's host[:port], or the bucket
    path: str  # the file in the repo, the URL's path and query, or the key
    revision: str = ""  # hf only: a branch, tag or commit ("main" when unset)
    sha256: str = ""  # the pinned digest of the bytes, or ""

    @property
    def text(self) -> str:
        if self.scheme == "hf":
            revision = f"@{self.revision}" if self.revision else ""
            return f"hf://{self.location}{revision}/{self.path}"
        return f"{self.scheme}://{self.location}/{self.path}"

    @property
    def pinned(self) -> str:
        """The canonical text with its pin: what names exactly these bytes."""
        return self.text + (f"#sha256={self.sha256}" if self.sha256 else "")

    @property
    def url(self) -> str:
        """The https URL (https references only)."""
        return f"https://{self.location}/{self.path}"


def is_reference(text: str) -> bool:
    """Whether ``text`` is meant as a reference (a scheme this module reads, or another)."""
    return "://" in text and not text.startswith("file://")


def parse_reference(text: str, field_name: str = "source") -> Reference:
    """The reference ``text`` names; InvalidArgument that shows the forms when it is none."""
    body, _, fragment = text.partition("#")
    sha256 = ""
    if fragment:
        sha256 = fragment.removeprefix("sha256=").lower()
        if not fragment.startswith("sha256=") or not _SHA256.match(sha256):
            raise InvalidArgument(
                f"{text!r}: the only fragment is #sha256=<64 hex digits> (the file's digest)",
                field_name,
            )
    scheme, _, rest = body.partition("://")
    parse = {"hf": _hub, "https": _https, "s3": _s3}.get(scheme)
    if parse is None:
        raise InvalidArgument(f"{text!r}: a reference is one of {FORMS}", field_name)
    problem, reference = parse(rest, sha256)
    if problem:
        raise InvalidArgument(f"{text!r}: {problem} (forms: {FORMS})", field_name)
    return reference


def adapter_id_for(reference: Reference) -> str:
    """The id a reference's adapter is served under when the request gives none (a pinned
    reference is another adapter than the same one unpinned)."""
    return "ref-" + hashlib.sha256(reference.pinned.encode()).hexdigest()[:20]


def _hub(rest: str, sha256: str) -> tuple[str, Reference | None]:
    owner, _, rest = rest.partition("/")
    repo, _, filename = rest.partition("/")
    repo, _, revision = repo.partition("@")
    if not (_REPO_PART.match(owner) and _REPO_PART.match(repo)):
        return "the repo is OWNER/REPO, letters, digits, '.', '_' and '-'", None
    if revision and not _REVISION.match(revision):
        return f"revision {revision!r} is not a branch, tag or commit name", None
    if not filename.endswith(".safetensors") or _unsafe_path(filename):
        return "name a .safetensors file in the repo (no '..', no leading '/')", None
    return "", Reference("hf", f"{owner}/{repo}", filename, revision, sha256)


def _https(rest: str, sha256: str) -> tuple[str, Reference | None]:
    parts = urlsplit("https://" + rest)
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return "the port is not a number", None
    if not parts.hostname or parts.username or parts.password:
        return "give a host (credentials go in the server's token settings, not the URL)", None
    path = rest[len(parts.netloc) :].lstrip("/")
    return "", Reference("https", parts.netloc.lower(), path, "", sha256)


def _s3(rest: str, sha256: str) -> tuple[str, Reference | None]:
    bucket, _, key = rest.partition("/")
    if not _BUCKET.match(bucket):
        return f"{bucket!r} is not an S3 bucket name", None
    if not key or _unsafe_path(key):
        return "give the object's key after the bucket", None
    return "", Reference("s3", bucket, key, "", sha256)


def _unsafe_path(path: str) -> bool:
    return path.startswith("/") or ".." in path.split("/") or "\\" in path
