"""The artifact store: where bundles, job inputs and checkpoints live for every replica.

``--artifact-store`` empty keeps them in the data dir (one machine, the default); an
``s3://bucket/prefix`` URL puts them in any S3-compatible store, with the endpoint and
credentials from the standard ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` and ``AWS_REGION``. Keys are relative paths like
``artifacts/<bundle id>/manifest.json``; in the local store they are the data dir's own
files, so publishing there is a no-op.

Every object appears whole or not at all (S3 PUTs, and local writes through a rename);
multipart uploads for large files are boto3's. Multi-file things (a bundle) are written with
the file that marks them complete last (bundle.py: the manifest).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from loraforge_core.files import safe_child


def unreachable(err: BaseException) -> bool:
    """Whether a store call failed because the store was away (down, restarting, unreachable,
    answering 5xx) after the client's own retries, not because of what the call asked: worth
    retrying later."""
    try:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import ClientError, ConnectionError, HTTPClientError
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return False
    if isinstance(err, S3UploadFailedError):  # boto3 wraps a ClientError's message only
        return any(f"({code})" in str(err) for code in _UNAVAILABLE_CODES)
    if isinstance(err, ClientError):
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or err.response.get("Error", {}).get("Code") in _UNAVAILABLE_CODES
    return isinstance(err, (ConnectionError, HTTPClientError))  # botocore's, after its retries


_UNAVAILABLE_CODES = ("InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout")


def s3_client():
    """A boto3 S3 client with the endpoint and keys from AWS_* (a session of its own:
    boto3's default one keeps the first credentials it found), retrying what S3 asks to."""
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3", config=Config(retries={"max_attempts": 5, "mode": "standard"})
    )


class ObjectStore:
    """put/get whole files by key; see LocalObjectStore and S3ObjectStore."""

    url = ""
    local_root: Path | None = None  # the data dir when objects are plain files there

    def put_file(self, key: str, source: Path) -> None:
        raise NotImplementedError

    def get_file(self, key: str, dest: Path) -> bool:
        """Copy the object to ``dest`` (atomically); False when there is no such object."""
        raise NotImplementedError

    def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` (a folder-like prefix ending in "/")."""
        raise NotImplementedError

    def delete(self, keys: Iterable[str]) -> None:
        """Remove these objects (a missing one is no error)."""
        raise NotImplementedError

    def put_files(self, prefix: str, folder: Path, names: Iterable[str]) -> None:
        """``folder/name`` to ``prefix + name``, in the order given (the last marks it done)."""
        for name in names:
            self.put_file(prefix + name, folder / name)

    def get_tree(self, prefix: str, folder: Path) -> int:
        """The objects under ``prefix`` that ``folder`` lacks, into it; how many."""
        fetched = 0
        for key in self.keys(prefix):
            local = safe_child(folder, key[len(prefix) :])
            if not local.exists():
                fetched += self.get_file(key, local)
        return fetched


def _copy_atomic(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalObjectStore(ObjectStore):
    """Objects are files under ``root`` (the data dir)."""

    def __init__(self, root: Path) -> None:
        self.local_root = Path(root)
        self.url = str(self.local_root)

    def _path(self, key: str) -> Path:
        assert self.local_root is not None
        return safe_child(self.local_root, key)

    def put_file(self, key: str, source: Path) -> None:
        target = self._path(key)
        if Path(source).resolve() != target:
            _copy_atomic(Path(source), target)

    def get_file(self, key: str, dest: Path) -> bool:
        source = self._path(key)
        if not source.is_file():
            return False
        if source != Path(dest).resolve():
            _copy_atomic(source, Path(dest))
        return True

    def keys(self, prefix: str) -> list[str]:
        assert self.local_root is not None
        root = self.local_root.resolve()
        folder = self._path(prefix.rstrip("/")) if prefix.strip("/") else root
        if not folder.is_dir():
            return []
        return sorted(
            str(p.relative_to(root)) for p in folder.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )  # fmt: skip

    def delete(self, keys: Iterable[str]) -> None:
        folders = set()
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            folders.add(path.parent)
        for folder in folders:  # a bundle's folder goes with its last file
            with contextlib.suppress(OSError):
                folder.rmdir()


class S3ObjectStore(ObjectStore):
    """Objects under ``s3://bucket/prefix`` through boto3 (endpoint and keys from AWS_*)."""

    def __init__(self, url: str) -> None:
        from boto3.s3.transfer import TransferConfig

        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"--artifact-store {url!r}: give s3://BUCKET[/PREFIX]")
        self.url = url
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client = s3_client()
        # Parts of 64 MiB past 64 MiB: a 1 GiB checkpoint is 16 parts, retried one by one.
        self.transfer = TransferConfig(
            multipart_threshold=64 * 2**20, multipart_chunksize=64 * 2**20
        )

    def check(self) -> None:
        """Fail early, naming the store, when it cannot be reached or read."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except (BotoCoreError, ClientError) as err:
            raise ConnectionError(f"cannot use the artifact store {self.url}: {err}") from err

    def _key(self, key: str) -> str:
        safe_child(Path("/r"), key)  # no absolute keys, no ".."
        return self.prefix + key

    def put_file(self, key: str, source: Path) -> None:
        self.client.upload_file(str(source), self.bucket, self._key(key), Config=self.transfer)

    def get_file(self, key: str, dest: Path) -> bool:
        from botocore.exceptions import ClientError

        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        os.close(fd)
        try:
            self.client.download_file(self.bucket, self._key(key), tmp, Config=self.transfer)
            os.replace(tmp, dest)
            return True
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        finally:
            Path(tmp).unlink(missing_ok=True)

    def keys(self, prefix: str) -> list[str]:
        found = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
            found += [item["Key"][len(self.prefix) :] for item in page.get("Contents", [])]
        return sorted(found)

    def delete(self, keys: Iterable[str]) -> None:
        keys = [self._key(key) for key in keys]
        for start in range(0, len(keys), 1000):  # S3's limit per DeleteObjects
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            reply = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})
            if reply.get("Errors"):
                raise OSError(f"the artifact store {self.url} kept objects: {reply['Errors'][:3]}")


def open_object_store(url: str, data_dir: Path) -> ObjectStore:
    """``s3://bucket/prefix``, or empty for the data dir itself."""
    if not url:
        return LocalObjectStore(data_dir)
    if not url.startswith("s3://"):
        raise ValueError(f"--artifact-store must be s3://BUCKET[/PREFIX] or empty; got {url!r}")
    store = S3ObjectStore(url)
    store.check()
    return store
