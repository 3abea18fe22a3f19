"""The training event protocol and the job store, without a server or a model."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pytest
from loraforge_client.types import JobEvent as ClientEvent

from tests.helpers import shape_png
from trainer_service import events, job_store
from trainer_service.config import TrainingConfig
from trainer_service.database import (
    MIGRATIONS,
    SCHEMA_VERSION,
    SchemaTooNew,
    SqliteDatabase,
    migrate,
    open_database,
    unreachable,
)
from trainer_service.job_store import CANCELLED, QUEUED, RUNNING, EventRecord, JobStore, LeaseLost
from trainer_service.jobdir import ImageUpload
from trainer_service.jobs import JobSpec, create_job
from trainer_service.proto_mapping import event_to_proto

EXAMPLES = [
    events.StateChange("failed", "training process was killed by SIGKILL"),
    events.Progress("tuning", 3, 10, 0.25, 1e-4, 2.5, 2.8, 13),
    events.Checkpoint("ab12", 10),
    events.FinalArtifact("cd34", 20),
    events.Preview(10, "a <s1> circle", b"\x89PNG\r\n\x1a\nbytes", 32, 32),
    events.Log("warning", "resuming from step 10"),
]


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: e.kind)
def test_every_event_survives_the_json_line_and_the_store_payload(event) -> None:
    assert events.parse_line(events.to_line(event)) == event
    assert events.from_payload(event.kind, events.to_payload(event)) == event


def test_output_that_is_not_an_event_is_ignored() -> None:
    for line in ["", "loading weights...", "{not json", '{"event": "nope"}', "[1, 2]"]:
        assert events.parse_line(line) is None


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: e.kind)
def test_the_client_reads_back_what_the_server_sends(event) -> None:
    received = ClientEvent.from_proto(event_to_proto(EventRecord("job-1", 7, 1.0, event)))
    assert (received.job_id, received.sequence, received.kind) == ("job-1", 7, event.kind)
    if isinstance(event, events.Progress):
        assert received.progress is not None
        assert asdict(received.progress) == pytest.approx(asdict(event))
    elif isinstance(event, events.Preview):
        assert received.preview_png == event.png and received.global_step == event.global_step
    elif isinstance(event, events.Log):
        assert (received.level, received.message) == (event.level, event.message)
    elif isinstance(event, events.StateChange):
        assert (received.state, received.reason) == (event.state, event.reason)
    else:
        assert received.artifact_id == event.artifact_id


@pytest.fixture
def store(database_url: str, tmp_path: Path):
    store = JobStore(open_database(database_url, tmp_path))
    yield store
    store.close()


def new_job(store: JobStore, request_id: str = "") -> str:
    job, created = store.create_job(
        request_id=request_id, method="pti", base_model="tiny", tokens=["<s1>"], num_images=2,
        config={"seed": 1},
    )  # fmt: skip
    assert created
    return job.job_id


def test_events_get_consecutive_sequences_and_replay_after_any_of_them(store) -> None:
    job_id = new_job(store)
    for event in EXAMPLES[1:]:
        store.append_event(job_id, event)
    store.set_state(job_id, CANCELLED, "cancelled by request")
    replay = store.events_after(job_id, 0)
    assert [r.sequence for r in replay] == list(range(1, len(EXAMPLES) + 2))
    assert [r.event for r in replay[1:-1]] == EXAMPLES[1:]
    assert replay[0].event == events.StateChange(QUEUED)
    assert [r.sequence for r in store.events_after(job_id, 4)] == [5, 6, 7]
    assert store.get_job(job_id).last_sequence == 7


def test_the_job_shows_its_latest_progress_and_state_times(store) -> None:
    job_id = new_job(store)
    assert store.get_job(job_id).progress is None
    store.set_state(job_id, RUNNING)
    store.append_event(job_id, EXAMPLES[1])
    job = store.get_job(job_id)
    assert job.progress == EXAMPLES[1] and job.started_at is not None
    failed = store.set_state(job_id, "failed", "out of memory")
    assert failed.failure_reason == "out of memory" and failed.finished_at is not None


def test_a_request_id_creates_one_job(store) -> None:
    job_id = new_job(store, "req-1")
    again, created = store.create_job(
        request_id="req-1", method="pti", base_model="other", tokens=[], num_images=1, config={}
    )
    assert not created and again.job_id == job_id
    assert store.job_by_request("req-1").job_id == job_id


def test_artifacts_are_recorded_once_and_the_final_one_marks_the_job(store) -> None:
    job_id = new_job(store)
    for _ in range(2):  # a resumed job reports its checkpoint again
        store.add_artifact(
            artifact_id="ck", job_id=job_id, kind="checkpoint", global_step=3, path="ck"
        )
    store.add_artifact(
        artifact_id="fin", job_id=job_id, kind="final", global_step=6, path="fin", final=True
    )
    job = store.get_job(job_id)
    assert job.checkpoint_artifact_ids == ["ck"] and job.final_artifact_id == "fin"
    assert store.get_artifact("fin").global_step == 6 and store.get_artifact("nope") is None


def test_retention_forgets_all_but_the_last_checkpoints_the_best_and_the_final(store) -> None:
    job_id = new_job(store)
    lease = store.claim_next("a", 60).lease
    for step in (2, 4, 6, 8, 10):
        store.add_artifact(artifact_id=f"ck{step}", job_id=job_id, kind="checkpoint",
                           global_step=step, path=f"ck{step}", lease=lease)  # fmt: skip
    best = events.CheckpointEvaluated("ck4", {"global_step": 4}, best=True)
    store.append_event(job_id, best, lease=lease)
    with pytest.raises(LeaseLost):  # only the claim that runs the job prunes
        store.prune_checkpoints(job_id, 2, lease=job_store.Lease("b", lease.epoch))
    pruned = store.prune_checkpoints(job_id, 2, lease=lease)
    assert sorted(r.artifact_id for r in pruned) == ["ck2", "ck6"]
    assert store.get_job(job_id).checkpoint_artifact_ids == ["ck4", "ck8", "ck10"]
    assert store.get_artifact("ck2") is None and store.get_artifact("ck4") is not None
    # The final artifact may be an older checkpoint (select_final best): it stays too.
    store.add_artifact(artifact_id="ck8", job_id=job_id, kind="final", global_step=8,
                       path="ck8", final=True, lease=lease)  # fmt: skip
    store.add_artifact(artifact_id="ck12", job_id=job_id, kind="checkpoint", global_step=12,
                       path="ck12", lease=lease)  # fmt: skip
    assert [r.artifact_id for r in store.prune_checkpoints(job_id, 1, lease=lease)] == ["ck10"]
    store.add_artifact(artifact_id="ck14", job_id=job_id, kind="checkpoint", global_step=14,
                       path="ck14", lease=lease)  # fmt: skip
    assert [r.artifact_id for r in store.prune_checkpoints(job_id, 1, lease=lease)] == ["ck12"]
    assert store.get_job(job_id).checkpoint_artifact_ids == ["ck4", "ck8", "ck14"]


def test_list_jobs_pages_in_creation_order_and_filters_by_state(store) -> None:
    ids = [new_job(store) for _ in range(5)]
    store.set_state(ids[1], RUNNING)
    assert [j.job_id for j in store.list_jobs(state=None, limit=2, offset=2)] == ids[2:4]
    assert [j.job_id for j in store.list_jobs(state=RUNNING, limit=10, offset=0)] == [ids[1]]
    assert store.claim_next("r1", 60).job_id == ids[0]


def test_threads_sharing_the_store_never_interleave_transactions(store) -> None:
    job_id = new_job(store)
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def writer() -> None:
        try:
            start.wait()
            for _ in range(100):
                store.append_event(job_id, EXAMPLES[5])
                store.events_after(job_id, 0, limit=5)
                store.get_job(job_id)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    sequences = [r.sequence for r in store.events_after(job_id, 0, limit=1000)]
    assert sequences == list(range(1, 402))


def test_concurrent_creates_with_one_request_id_make_one_job(store, tmp_path: Path) -> None:
    spec = JobSpec(
        request_id="same", config=TrainingConfig(seed=1), images=[ImageUpload(shape_png())]
    )
    start = threading.Barrier(4)

    def create() -> tuple[str, bool]:
        start.wait()
        job, created = create_job(store, tmp_path / "jobs", spec)
        return job.job_id, created

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: create(), range(4)))
    assert len({job_id for job_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert [p.name for p in (tmp_path / "jobs").iterdir()] == [results[0][0]]


def test_a_resume_point_past_any_sequence_gives_no_events(store) -> None:
    job_id = new_job(store)
    assert store.events_after(job_id, 2**64 - 1) == []


def test_replicas_claiming_at_once_take_each_job_exactly_once(store) -> None:
    ids = {new_job(store) for _ in range(20)}
    start = threading.Barrier(4)

    def claim(owner: str) -> list[str]:
        start.wait()
        taken = []
        while (job := store.claim_next(owner, 60)) is not None:
            taken.append(job.job_id)
        return taken

    with ThreadPoolExecutor(4) as pool:
        taken = list(pool.map(claim, ["a", "b", "c", "d"]))
    everything = [job_id for owner in taken for job_id in owner]
    assert sorted(everything) == sorted(ids)  # each once
    for owner, jobs in zip("abcd", taken, strict=True):
        assert all(store.get_job(j).owner == owner for j in jobs)


def test_a_claim_skips_a_job_another_replica_has_locked_instead_of_waiting(
    postgres_server,
) -> None:
    """PostgreSQL only: SQLite runs one write transaction at a time, so nothing is locked by
    row there. A replica in the middle of claiming the oldest job holds its row; another
    replica's claim takes the next job at once (SKIP LOCKED) instead of queueing behind it."""
    store = JobStore(open_database(postgres_server.new_database(), Path("unused")))
    first, second = new_job(store), new_job(store)
    holding, release = threading.Event(), threading.Event()

    def claim_in_progress() -> None:
        with store.db.transaction() as tx:
            tx.one("SELECT job_id FROM jobs WHERE job_id=? FOR UPDATE", (first,))
            holding.set()
            release.wait()

    with ThreadPoolExecutor(2) as pool:
        holder = pool.submit(claim_in_progress)
        holding.wait()
        claim = pool.submit(store.claim_next, "b", 60)
        try:
            taken = claim.result(timeout=20)  # a claim that waits on the lock never returns
        finally:
            release.set()
        holder.result()
    assert taken is not None and taken.job_id == second
    store.close()


def test_a_replica_stalled_inside_a_transaction_loses_its_row_lock_with_its_lease(
    postgres_server,
) -> None:
    """A replica frozen between two statements of a transaction holds its job's row lock,
    and every other replica's claim skips locked rows: unless the server ends the stalled
    session once the lease could have run out, the job is nobody's until the replica wakes."""
    import psycopg

    url = postgres_server.new_database()
    a, b = (JobStore(open_database(url, Path("unused"), name=f"loraforge-{r}", lease_s=1))
            for r in "ab")  # fmt: skip
    job_id = new_job(a)
    lease = a.claim_next("a", lease_s=1).lease
    stalled, wake = threading.Event(), threading.Event()

    def append_and_stall() -> None:
        with a.db.transaction() as tx:
            tx.one("SELECT job_id FROM jobs WHERE job_id=? FOR UPDATE", (job_id,))
            stalled.set()
            wake.wait()
            tx.one("SELECT 1 AS one")

    def claim_for_b() -> job_store.Claim:
        deadline = time.monotonic() + 30
        while (taken := b.claim_next("b", lease_s=60)) is None:
            assert time.monotonic() < deadline, "the stalled replica's row lock outlived its lease"
            time.sleep(0.1)
        return taken

    with ThreadPoolExecutor(1) as pool, psycopg.connect(url) as watcher:
        stalled_a = pool.submit(append_and_stall)
        try:
            stalled.wait()
            names = watcher.execute(
                "SELECT application_name FROM pg_stat_activity WHERE state='idle in transaction'"
            ).fetchall()
            assert names == [("loraforge-a",)]
            taken = claim_for_b()
        finally:
            wake.set()
        with pytest.raises(psycopg.Error) as ended:  # the server ended a's session
            stalled_a.result()
    assert unreachable(ended.value)  # a retries, and its retry finds the job gone:
    assert taken.job_id == job_id and taken.took_over
    with pytest.raises(LeaseLost):  # a, awake, writes nothing more for the job
        a.append_event(job_id, EXAMPLES[1], lease=lease)
    a.close()
    b.close()


def test_a_change_on_one_replica_reaches_another_through_listen_notify(postgres_server):
    """PostgreSQL's NOTIFY, not polling: what wakes other replicas' watchers and runners."""
    url = postgres_server.new_database()
    a, b = (JobStore(open_database(url, Path("unused"))) for _ in "ab")
    job_id = new_job(a)
    heard = threading.Event()
    b.db.listen(lambda changed: heard.set() if changed == job_id else None)
    for _ in range(60):  # b's LISTEN starts on its own thread: tell it again until it hears
        with a.db.transaction() as tx:
            a.db.notify(tx, job_id)
        if heard.wait(0.5):
            break
    assert heard.is_set()
    a.close()
    b.close()


def test_an_expired_lease_passes_the_job_to_another_replica(store) -> None:
    job_id = new_job(store)
    first = store.claim_next("a", lease_s=-1)  # a lease that has run out: replica a "died"
    assert first.state == RUNNING and first.owner == "a" and first.attempts == 1
    second = store.claim_next("b", lease_s=60)
    assert second.job_id == job_id and second.owner == "b" and second.attempts == 2
    assert store.claim_next("c", lease_s=60) is None  # b's lease is live
    with pytest.raises(LeaseLost):  # a's late writes are refused
        store.append_event(job_id, EXAMPLES[1], lease=first.lease)
    with pytest.raises(LeaseLost):
        store.renew(job_id, first.lease, 60)
    assert store.renew(job_id, second.lease, 60) is False  # no cancel asked
    takeover = store.events_after(job_id, 0)[-1].event
    assert "replica a stopped renewing its lease; replica b resumes" in takeover.message
    store.set_state(job_id, "succeeded", lease=second.lease)
    done = store.get_job(job_id)
    assert done.owner == "" and done.lease_expires_at is None


def test_a_claim_fences_off_an_earlier_claim_by_the_same_replica(store) -> None:
    """Replica ids survive restarts (a pod's name): a frozen incarnation that wakes after its
    own restarted successor took the job back must not write as if it still ran it."""
    job_id = new_job(store)
    stale = store.claim_next("a", lease_s=-1).lease  # froze past its lease
    fresh = store.claim_next("a", lease_s=60).lease  # a again: restarted, took it back
    assert (stale.owner, fresh.owner) == ("a", "a") and fresh.epoch == stale.epoch + 1
    for write in (
        lambda lease: store.append_event(job_id, EXAMPLES[1], lease=lease),
        lambda lease: store.add_artifact(artifact_id="ck", job_id=job_id, kind="checkpoint",
                                         global_step=2, path="ck", lease=lease),
        lambda lease: store.renew(job_id, lease, 60),
        lambda lease: store.prune_checkpoints(job_id, 1, lease=lease),
        lambda lease: store.set_state(job_id, "failed", "stale", lease=lease),
    ):  # fmt: skip
        with pytest.raises(LeaseLost):
            write(stale)
        write(fresh)
    assert store.get_job(job_id).state == "failed"


class SkewedClock:
    """The ``time`` module as a replica whose clock is off by ``offset`` seconds sees it."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def time(self) -> float:
        return time.time() + self.offset


def test_leases_go_by_the_databases_clock_whatever_a_replicas_says(store, monkeypatch) -> None:
    job_id = new_job(store)
    claim = store.claim_next("a", lease_s=60)
    assert claim.job_id == job_id
    monkeypatch.setattr(job_store, "time", SkewedClock(-3600))  # a's clock runs an hour late
    store.renew(job_id, claim.lease, lease_s=60)
    monkeypatch.setattr(job_store, "time", SkewedClock(+3600))  # b's an hour early
    assert store.claim_next("b", lease_s=60) is None  # a's lease has a minute to run
    assert store.get_job(job_id).owner == "a"


def test_cancel_stops_a_queued_job_at_once_and_asks_the_owner_of_a_running_one(store) -> None:
    queued, running, orphan = new_job(store), new_job(store), new_job(store)
    assert store.request_cancel(queued).state == CANCELLED
    claim = store.claim_next("a", 60)
    assert claim.job_id == running
    assert store.claim_next("b", -1).job_id == orphan  # b dies at once
    assert store.request_cancel(running).cancel_requested
    assert store.renew(running, claim.lease, 60) is True  # a learns it at its next heartbeat
    store.request_cancel(orphan)
    assert store.claim_next("c", 60) is None  # the orphan is cancelled, not resumed
    assert store.get_job(orphan).state == CANCELLED


def test_a_restarted_replica_requeues_the_jobs_it_was_running(store) -> None:
    mine, theirs = new_job(store), new_job(store)
    store.claim_next("a", 60)
    store.claim_next("b", 60)
    assert store.requeue_owned("a", "the server restarted") == [mine]
    assert store.get_job(mine).state == QUEUED and store.get_job(theirs).state == RUNNING


def test_an_old_database_is_migrated_and_a_newer_one_refused(tmp_path: Path) -> None:
    import sqlite3

    old = sqlite3.connect(tmp_path / "jobs.sqlite3")  # the schema before versioning: v1
    for statement in MIGRATIONS[0]:
        old.execute(statement)
    old.execute(
        "INSERT INTO jobs (job_id, request_id, state, method, base_model, tokens, num_images,"
        " config, created_at) VALUES ('job-old', 'job-old', 'running', 'pti', 'tiny', '[]', 1,"
        " '{}', 1.0)"
    )
    old.commit()
    old.close()
    store = JobStore(open_database("", tmp_path))
    assert store.get_job("job-old").owner == ""  # the new columns, with their defaults
    assert store.requeue_owned("local", "restarted") == ["job-old"]
    store.close()
    db = SqliteDatabase(tmp_path / "jobs.sqlite3")
    with db.transaction() as tx:
        tx.run("UPDATE schema_version SET version=?", (SCHEMA_VERSION + 1,))
    with pytest.raises(SchemaTooNew, match="upgrade this replica"):
        migrate(db)
    db.close()
