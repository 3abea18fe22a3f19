"""The artifact store on both backends: the data dir, and S3 (a real SeaweedFS server)."""

from __future__ import annotations

import sys
import threading
import time
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
    assert store.get_tree("jobs/j1/", tmp_path / "tree") == 0  # what is there stays
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


def stored_bundles(store, tmp_path: Path, count: int) -> list[str]:
    """Real bundles (random weights), published to ``store``."""
    import torch

    from loraforge_core import bundle as bundles
    from loraforge_core.artifacts import publish_bundle

    ids = []
    for seed in range(count):
        generator = torch.Generator().manual_seed(seed)
        manifest = bundles.Manifest(
            base_model="tiny", method="pti", tokens=["<s1>"], rank=2,
            unet_target_modules=["to_q"], text_encoder_target_modules=[], global_step=seed,
            text_hidden_size=4, cross_attention_dim=4,
        )  # fmt: skip
        made = bundles.store_bundle(
            tmp_path / "made", {"unet.x.lora_A.weight": torch.randn(2, 4, generator=generator)},
            {"<s1>": torch.randn(4, generator=generator)}, manifest,
        )  # fmt: skip
        publish_bundle(store, made.path)
        ids.append(made.id)
    return ids


def test_the_bundle_cache_fetches_once_verifies_and_drops_the_least_recent(
    store, tmp_path: Path
) -> None:
    import os

    from loraforge_core.artifacts import BundleCache
    from loraforge_core.bundle import BundleError, read_bundle

    ids = stored_bundles(store, tmp_path, 3)
    size = read_bundle(tmp_path / "made" / ids[0]).size_bytes()
    in_use: set[Path] = set()
    cache = BundleCache(store, tmp_path / "cache", limit_bytes=2 * size, in_use=lambda: in_use)
    first = cache.get(ids[0])
    assert first is not None and read_bundle(first).id == ids[0]  # verifies every sha256
    assert cache.get(ids[0]) == first and cache.fetches == 1  # the second time: local
    in_use.add(first)  # a loaded adapter: never dropped
    os.utime(first, (1, 1))  # and the least recently used
    cache.get(ids[1])
    cache.get(ids[2])  # three bundles do not fit in two bundles' room
    kept = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert kept == sorted([ids[0], ids[2]]) and cache.fetches == 3
    assert cache.get("lora-" + "0" * 24) is None  # not in the store
    # A bundle whose bytes changed in the store does not verify and is not cached.
    if isinstance(store, LocalObjectStore):
        victim = store.local_root / "artifacts" / ids[1] / "pytorch_lora_weights.safetensors"
    else:
        victim = tmp_path / "tampered"
        store.get_file(f"artifacts/{ids[1]}/pytorch_lora_weights.safetensors", victim)
    victim.write_bytes(victim.read_bytes()[:-4] + b"\0\0\0\0")
    if not isinstance(store, LocalObjectStore):
        store.put_file(f"artifacts/{ids[1]}/pytorch_lora_weights.safetensors", victim)
    with pytest.raises(BundleError, match="sha256"):
        cache.get(ids[1])
    assert not (tmp_path / "cache" / ids[1]).exists()


def waiting_in(thread: threading.Thread, function: str) -> bool:
    """Whether ``thread`` is inside a call of ``function`` now (its stack, sampled)."""
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


class PausedStore(LocalObjectStore):
    """A store whose downloads wait until ``resume`` is set (a slow network, held still)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.downloading, self.resume = threading.Event(), threading.Event()

    def get_file(self, key: str, dest: Path) -> bool:
        self.downloading.set()
        self.resume.wait()
        return super().get_file(key, dest)


def test_a_download_shared_with_a_waiter_holding_the_registrys_lock_completes(
    tmp_path: Path,
) -> None:
    """The generator's pipeline thread may wait for a bundle another thread is downloading
    while it holds the adapter registry's lock, which the cache takes (through ``in_use``)
    to evict: the waiter must be released before the leader evicts."""
    from loraforge_core.artifacts import BundleCache

    store = PausedStore(tmp_path / "remote")
    (bundle_id,) = stored_bundles(store, tmp_path, 1)
    registry_lock = threading.Lock()

    def in_use() -> set[Path]:
        with registry_lock:
            return set()

    cache = BundleCache(store, tmp_path / "cache", limit_bytes=2**30, in_use=in_use)
    leader = threading.Thread(target=cache.get, args=(bundle_id,), daemon=True)
    leader.start()
    assert store.downloading.wait(60)
    got: list[Path | None] = []

    def waiter() -> None:  # the pipeline thread: the lock held, the same bundle asked for
        with registry_lock:
            got.append(cache.get(bundle_id))

    pipeline = threading.Thread(target=waiter, daemon=True)
    pipeline.start()
    deadline = time.monotonic() + 60
    while not waiting_in(pipeline, "result"):  # until it waits for the leader's download
        assert pipeline.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    store.resume.set()
    pipeline.join(30)  # a bound on a deadlock, not a timing
    leader.join(30)
    assert not pipeline.is_alive() and not leader.is_alive(), "the two threads deadlocked"
    assert got == [tmp_path / "cache" / bundle_id]


def test_a_bundle_stored_under_another_bundles_id_is_refused(store, tmp_path: Path) -> None:
    from loraforge_core.artifacts import bundle_key, fetch_bundle
    from loraforge_core.bundle import BUNDLE_FILES, BundleError

    real, other = stored_bundles(store, tmp_path, 2)
    store.put_files(bundle_key(other), tmp_path / "made" / real, BUNDLE_FILES)  # swapped in
    with pytest.raises(BundleError, match=f"{other} holds bundle {real}"):
        fetch_bundle(store, other, tmp_path / "fetched" / other)
    assert not (tmp_path / "fetched" / other).exists()
    assert fetch_bundle(store, real, tmp_path / "fetched" / real).id == real
