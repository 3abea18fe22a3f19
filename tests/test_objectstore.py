"""The artifact store on both backends: the data dir, and S3 (a real SeaweedFS server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge_core.objectstore import LocalObjectStore, S3ObjectStore, open_object_store


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    url = "" if request.param == "local" else request.getfixturevalue("s3_url")
    return open_object_store(url, tmp_path / "data")


def test_files_round_trip_under_their_keys(store, tmp_path: Path) -> None:
    source = tmp_path / "in.bin"
    source.write_bytes(b"x" * 1000)
    store.put_file("jobs/j1/images/0000-a.png", source)
    store.put_file("jobs/j1/config.json", source)
    store.put_file("jobs/j2/config.json", source)
    assert store.keys("jobs/j1/") == ["jobs/j1/config.json", "jobs/j1/images/0000-a.png"]
    assert store.get_file("jobs/j1/config.json", tmp_path / "out" / "c.json")
    assert (tmp_path / "out" / "c.json").read_bytes() == b"x" * 1000
    assert not store.get_file("jobs/none/config.json", tmp_path / "out" / "none")
    assert not (tmp_path / "out" / "none").exists()
    assert store.get_tree("jobs/j1/", tmp_path / "tree") == 2
    assert (tmp_path / "tree" / "images" / "0000-a.png").read_bytes() == b"x" * 1000


def test_keys_cannot_leave_the_store(store, tmp_path: Path) -> None:
    source = tmp_path / "in.bin"
    source.write_bytes(b"x")
    for key in ("../escape", "/etc/passwd", "a/../../b"):
        with pytest.raises(ValueError):
            store.put_file(key, source)


def test_a_large_file_goes_up_in_parts_and_comes_back_whole(s3_url, tmp_path: Path) -> None:
    store = open_object_store(s3_url, tmp_path)
    assert isinstance(store, S3ObjectStore)
    store.transfer.multipart_threshold = store.transfer.multipart_chunksize = 5 * 2**20
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * (12 * 2**20 // 256))  # 12 MiB: 3 parts
    store.put_file("artifacts/big/file", big)
    head = store.client.head_object(Bucket=store.bucket, Key=store._key("artifacts/big/file"))
    assert head["ETag"].strip('"').endswith("-3")  # S3's mark of a 3-part upload
    assert store.get_file("artifacts/big/file", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()


def test_the_local_store_is_the_data_dir_itself(tmp_path: Path) -> None:
    store = open_object_store("", tmp_path)
    assert isinstance(store, LocalObjectStore) and store.local_root == tmp_path
    (tmp_path / "artifacts" / "b").mkdir(parents=True)
    (tmp_path / "artifacts" / "b" / "f").write_bytes(b"1")
    store.put_file("artifacts/b/f", tmp_path / "artifacts" / "b" / "f")  # already there: no-op
    assert store.keys("artifacts/") == ["artifacts/b/f"]


def test_a_wrong_url_or_key_is_a_clear_error(s3_server, monkeypatch, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="s3://BUCKET"):
        open_object_store("gs://x", tmp_path)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(ConnectionError, match="cannot use the artifact store s3://"):
        open_object_store(f"s3://{s3_server.bucket}/p", tmp_path)
