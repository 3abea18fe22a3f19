"""The persistent job store: jobs, their event log and artifact records, and the queue.

Every event gets the next sequence number of its job inside one transaction, so a watcher that
resumes after sequence N gets exactly the events it missed, also after a restart and from any
replica. The rows live in SQLite or PostgreSQL (database.py).

Running jobs are leased: the replica that claims a job (``claim_next``) owns it until its lease
expires, and renews the lease while the job runs (``renew``). A job whose lease expired (its
replica died) is claimed again like a queued one and resumes from its last checkpoint. Writes
on behalf of a running job name their owner and are refused once another replica has it.
Leases are taken, renewed and expired by the database's clock (``Database.now``), never by a
replica's own, so replicas whose clocks disagree still agree on who owns a job.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from trainer_service.database import Database, SqliteDatabase, Tx
from trainer_service.events import (
    CheckpointEvaluated,
    JobEvent,
    Log,
    Progress,
    StateChange,
    from_payload,
    to_payload,
)

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued", "running", "succeeded", "failed", "cancelled",
)  # fmt: skip
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
MAX_SQL_INTEGER = 2**63 - 1  # both databases' largest integer


class LeaseLost(RuntimeError):
    """Another replica owns the job now (this one's lease expired)."""


@dataclass
class JobRecord:
    job_id: str
    request_id: str
    state: str
    method: str
    base_model: str
    tokens: list[str]
    num_images: int
    config: dict[str, Any]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    failure_reason: str = ""
    progress: Progress | None = None
    final_artifact_id: str = ""
    last_sequence: int = 0
    checkpoint_artifact_ids: list[str] = field(default_factory=list)
    owner: str = ""  # the replica running it (while RUNNING)
    lease_expires_at: float | None = None
    cancel_requested: bool = False
    attempts: int = 0  # times a replica claimed it
    request_trace: str = ""  # the x-request-id of the CreateJob call
    best_artifact_id: str = ""  # the checkpoint whose evaluation scored best


@dataclass
class Claim(JobRecord):
    """A job just claimed; ``took_over`` when its previous replica's lease had expired."""

    took_over: bool = False

    @property
    def lease(self) -> Lease:
        return Lease(self.owner, self.attempts)


@dataclass(frozen=True)
class Lease:
    """The fencing token of one claim: the replica and the job's claim count when it took it.
    Every write of the job's runner carries it; once another claim (by another replica, or a
    restarted incarnation of the same one) raises the count, the old token's writes fail."""

    owner: str
    epoch: int


@dataclass
class EventRecord:
    job_id: str
    sequence: int
    time: float
    event: JobEvent


@dataclass
class ArtifactRecord:
    artifact_id: str
    job_id: str
    kind: str
    global_step: int
    path: str
    created_at: float
    resume_key: str = ""  # a checkpoint's training state in the artifact store ("": none)


class JobStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    @classmethod
    def sqlite(cls, path) -> JobStore:
        """A migrated SQLite store at ``path`` (tests and tools)."""
        from trainer_service.database import migrate

        db = SqliteDatabase(path)
        migrate(db)
        return cls(db)

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ jobs
    def create_job(
        self,
        *,
        request_id: str,
        method: str,
        base_model: str,
        tokens: list[str],
        num_images: int,
        config: dict[str, Any],
        job_id: str | None = None,
        request_trace: str = "",
    ) -> tuple[JobRecord, bool]:
        """Insert a QUEUED job; with a known request_id return that job instead (created=False).

        The insert itself decides (ON CONFLICT on the unique request_id), so concurrent
        requests with one request_id create one job, on one replica or several."""
        job_id = job_id or "job-" + uuid.uuid4().hex[:16]
        now = time.time()
        with self.db.transaction() as tx:
            inserted = tx.one(
                "INSERT INTO jobs (job_id, request_id, state, method, base_model, tokens,"
                " num_images, config, created_at, request_trace) VALUES (?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (request_id) DO NOTHING RETURNING job_id",
                (job_id, request_id or job_id, QUEUED, method, base_model, json.dumps(tokens),
                 num_images, json.dumps(config), now, request_trace),
            )  # fmt: skip
            if inserted is not None:
                self._append(tx, job_id, StateChange(QUEUED), now)
        if inserted is None:
            existing = self.job_by_request(request_id)
            assert existing is not None, request_id
            return existing, False
        return self._existing(job_id), True

    def _to_job(self, tx: Tx, row: dict[str, Any]) -> JobRecord:
        checkpoints = [
            r["artifact_id"] for r in tx.rows(
                "SELECT artifact_id FROM artifacts WHERE job_id=? AND kind='checkpoint'"
                " ORDER BY global_step", (row["job_id"],),
            )
        ]  # fmt: skip
        return JobRecord(
            job_id=row["job_id"], request_id=row["request_id"], state=row["state"],
            method=row["method"], base_model=row["base_model"], tokens=json.loads(row["tokens"]),
            num_images=row["num_images"], config=json.loads(row["config"]),
            created_at=row["created_at"], started_at=row["started_at"],
            finished_at=row["finished_at"], failure_reason=row["failure_reason"],
            progress=_progress(row["progress"]), final_artifact_id=row["final_artifact_id"],
            last_sequence=row["last_sequence"], checkpoint_artifact_ids=checkpoints,
            owner=row["owner"], lease_expires_at=row["lease_expires_at"],
            cancel_requested=bool(row["cancel_requested"]), attempts=row["attempts"],
            request_trace=row["request_trace"], best_artifact_id=row["best_artifact_id"],
        )  # fmt: skip

    def get_job(self, job_id: str) -> JobRecord | None:
        with self.db.read() as tx:
            row = tx.one("SELECT * FROM jobs WHERE job_id=?", (job_id,))
            return self._to_job(tx, row) if row else None

    def _existing(self, job_id: str) -> JobRecord:
        job = self.get_job(job_id)
        assert job is not None, job_id
        return job

    def job_by_request(self, request_id: str) -> JobRecord | None:
        with self.db.read() as tx:
            row = tx.one("SELECT * FROM jobs WHERE request_id=?", (request_id,))
            return self._to_job(tx, row) if row else None

    def list_jobs(self, *, state: str | None, limit: int, offset: int) -> list[JobRecord]:
        where, params = ("WHERE state=?", [state]) if state else ("", [])
        with self.db.read() as tx:
            rows = tx.rows(
                f"SELECT * FROM jobs {where} ORDER BY created_at, job_id LIMIT ? OFFSET ?",
                (*params, limit, offset),
            )
            return [self._to_job(tx, r) for r in rows]

    def set_state(
        self, job_id: str, state: str, reason: str = "", *, lease: Lease | None = None
    ) -> JobRecord:
        """Change state and log a state event, in one transaction. With ``lease``, only while
        that claim still holds the job (else LeaseLost); leaving RUNNING ends the lease."""
        now = time.time()
        with self.db.transaction() as tx:
            self._check_lease(tx, job_id, lease)
            self._set_state(tx, job_id, state, reason, now)
        return self._existing(job_id)

    def _set_state(self, tx: Tx, job_id: str, state: str, reason: str, now: float) -> None:
        sets = ["state=?"]
        params: list[Any] = [state]
        if state == RUNNING:
            sets.append("started_at=COALESCE(started_at, ?)")
            params.append(now)
        else:
            sets += ["owner=''", "lease_expires_at=NULL"]
        if state in TERMINAL:
            sets += ["finished_at=?", "failure_reason=?", "cancel_requested=0"]
            params += [now, reason if state == FAILED else ""]
        tx.run(f"UPDATE jobs SET {', '.join(sets)} WHERE job_id=?", (*params, job_id))
        self._append(tx, job_id, StateChange(state, reason), now)

    @staticmethod
    def _check_lease(tx: Tx, job_id: str, lease: Lease | None) -> None:
        if lease is None:
            return
        row = tx.one(
            "SELECT owner, state, attempts FROM jobs WHERE job_id=?" + _for_update(tx), (job_id,)
        )
        if row is None or row["state"] != RUNNING or (row["owner"], row["attempts"]) != (
            lease.owner, lease.epoch
        ):  # fmt: skip
            raise LeaseLost(f"job {job_id} is no longer run by {lease.owner} (claim {lease.epoch})")

    # ------------------------------------------------------------------ the queue
    def claim_next(self, owner: str, lease_s: float) -> Claim | None:
        """Take the oldest QUEUED job, or a RUNNING one whose lease expired (its replica
        died), for ``owner`` until now + ``lease_s``. Replicas claiming at once get different
        jobs (row locks, SKIP LOCKED)."""
        now = time.time()  # for the events; the lease goes by the database's clock
        with self.db.transaction() as tx:
            row = tx.one(
                "SELECT job_id, state, owner, cancel_requested FROM jobs"
                f" WHERE state=? OR (state=? AND lease_expires_at < {self.db.now})"
                " ORDER BY created_at, job_id LIMIT 1" + self.db.skip_locked,
                (QUEUED, RUNNING),
            )
            if row is None:
                return None
            job_id = row["job_id"]
            if row["cancel_requested"]:  # its replica died before it could stop it
                self._set_state(tx, job_id, CANCELLED, "cancelled by request", now)
                self.db.notify(tx, job_id)
                return None
            tx.run(
                f"UPDATE jobs SET owner=?, lease_expires_at={self.db.now} + ?,"
                " attempts=attempts+1 WHERE job_id=?",
                (owner, lease_s, job_id),
            )
            if row["state"] == QUEUED:
                self._set_state(tx, job_id, RUNNING, f"on replica {owner}", now)
            else:
                self._append(tx, job_id, Log(
                    "warning", f"replica {row['owner']} stopped renewing its lease; replica "
                    f"{owner} resumes the job from its last checkpoint",
                ), now)  # fmt: skip
            self.db.notify(tx, job_id)
        job = self._existing(job_id)
        fields = {f.name: getattr(job, f.name) for f in dataclasses.fields(job)}
        return Claim(**fields, took_over=row["state"] == RUNNING)

    def count_by_state(self) -> dict[str, int]:
        with self.db.read() as tx:
            rows = tx.rows("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    def renew(self, job_id: str, lease: Lease, lease_s: float) -> bool:
        """Extend a claim's lease on a running job; whether a cancel was asked of it. Raises
        LeaseLost when the job is no longer that claim's to run."""
        with self.db.transaction() as tx:
            row = tx.one(
                f"UPDATE jobs SET lease_expires_at={self.db.now} + ?"
                " WHERE job_id=? AND owner=? AND attempts=? AND state=? RETURNING cancel_requested",
                (lease_s, job_id, lease.owner, lease.epoch, RUNNING),
            )
        if row is None:
            raise LeaseLost(f"job {job_id} is no longer run by {lease.owner} (claim {lease.epoch})")
        return bool(row["cancel_requested"])

    def requeue_owned(self, owner: str, reason: str) -> list[str]:
        """Put ``owner``'s RUNNING jobs back in the queue (it restarted: they are not running
        anywhere); they resume from their last checkpoint when claimed."""
        now = time.time()
        requeued = []
        with self.db.transaction() as tx:
            for row in tx.rows(
                "SELECT job_id FROM jobs WHERE state=? AND owner IN (?, '')", (RUNNING, owner)
            ):
                self._append(tx, row["job_id"], Log("warning", reason), now)
                self._set_state(tx, row["job_id"], QUEUED, "resuming after a restart", now)
                self.db.notify(tx, row["job_id"])
                requeued.append(row["job_id"])
        return requeued

    def request_cancel(self, job_id: str) -> JobRecord:
        """Cancel a QUEUED job at once; mark a RUNNING one for its owner to stop."""
        now = time.time()
        with self.db.transaction() as tx:
            row = tx.one("SELECT state FROM jobs WHERE job_id=?" + _for_update(tx), (job_id,))
            if row is not None and row["state"] == QUEUED:
                self._set_state(tx, job_id, CANCELLED, "cancelled by request", now)
            elif row is not None and row["state"] == RUNNING:
                tx.run("UPDATE jobs SET cancel_requested=1 WHERE job_id=?", (job_id,))
            self.db.notify(tx, job_id)
        return self._existing(job_id)

    # ------------------------------------------------------------------ events
    def _append(self, tx: Tx, job_id: str, event: JobEvent, now: float) -> int:
        payload = json.dumps(to_payload(event))
        sequence = tx.one(
            "UPDATE jobs SET last_sequence = last_sequence + 1 WHERE job_id=?"
            " RETURNING last_sequence", (job_id,),
        )["last_sequence"]  # fmt: skip
        tx.run(
            "INSERT INTO events (job_id, sequence, time, kind, payload) VALUES (?,?,?,?,?)",
            (job_id, sequence, now, event.kind, payload),
        )
        if isinstance(event, Progress):
            tx.run("UPDATE jobs SET progress=? WHERE job_id=?", (payload, job_id))
        self.db.notify(tx, job_id)
        return sequence

    def append_event(self, job_id: str, event: JobEvent, *, lease: Lease | None = None) -> int:
        with self.db.transaction() as tx:
            self._check_lease(tx, job_id, lease)
            sequence = self._append(tx, job_id, event, time.time())
            if isinstance(event, CheckpointEvaluated) and event.best:
                tx.run("UPDATE jobs SET best_artifact_id=? WHERE job_id=?",
                       (event.artifact_id, job_id))  # fmt: skip
        return sequence

    def events_after(self, job_id: str, after: int, limit: int = 500) -> list[EventRecord]:
        after = min(after, MAX_SQL_INTEGER)  # a client may send any uint64
        with self.db.read() as tx:
            rows = tx.rows(
                "SELECT * FROM events WHERE job_id=? AND sequence>? ORDER BY sequence LIMIT ?",
                (job_id, after, limit),
            )
        return [
            EventRecord(r["job_id"], r["sequence"], r["time"], _event(r["kind"], r["payload"]))
            for r in rows
        ]

    # ------------------------------------------------------------------ artifacts
    def add_artifact(
        self,
        *,
        artifact_id: str,
        job_id: str,
        kind: str,
        global_step: int,
        path: str,
        final: bool = False,
        resume_key: str = "",
        lease: Lease | None = None,
    ) -> None:
        """Record an artifact (idempotent: a resumed job may report the same one again)."""
        with self.db.transaction() as tx:
            self._check_lease(tx, job_id, lease)
            tx.run(
                "INSERT INTO artifacts"
                " (artifact_id, job_id, kind, global_step, path, created_at, resume_key)"
                " VALUES (?,?,?,?,?,?,?) ON CONFLICT (artifact_id) DO NOTHING",
                (artifact_id, job_id, kind, global_step, path, time.time(), resume_key),
            )
            if final:
                tx.run("UPDATE jobs SET final_artifact_id=? WHERE job_id=?", (artifact_id, job_id))

    def prune_checkpoints(
        self, job_id: str, keep: int, *, lease: Lease | None = None
    ) -> list[ArtifactRecord]:
        """Forget the job's checkpoint artifacts past retention: all but the last ``keep`` by
        step, the best-scoring one and the final one. Returns the forgotten, whose files the
        caller deletes (a reader never finds a record without its files)."""
        with self.db.transaction() as tx:
            self._check_lease(tx, job_id, lease)
            job = tx.one("SELECT best_artifact_id, final_artifact_id FROM jobs WHERE job_id=?",
                         (job_id,))  # fmt: skip
            rows = tx.rows(
                "SELECT * FROM artifacts WHERE job_id=? AND kind='checkpoint'"
                " ORDER BY global_step DESC", (job_id,),
            )  # fmt: skip
            protected = {job["best_artifact_id"], job["final_artifact_id"]}
            pruned = [r for r in rows[keep:] if r["artifact_id"] not in protected]
            for row in pruned:
                tx.run("DELETE FROM artifacts WHERE artifact_id=?", (row["artifact_id"],))
        return [ArtifactRecord(**row) for row in pruned]

    def latest_checkpoint(self, job_id: str) -> ArtifactRecord | None:
        """The job's checkpoint of the highest step: where a resumed run starts."""
        with self.db.read() as tx:
            row = tx.one(
                "SELECT * FROM artifacts WHERE job_id=? AND kind='checkpoint'"
                " ORDER BY global_step DESC LIMIT 1", (job_id,),
            )  # fmt: skip
        return ArtifactRecord(**row) if row else None

    def get_artifact(self, artifact_id: str) -> ArtifactRecord | None:
        with self.db.read() as tx:
            row = tx.one("SELECT * FROM artifacts WHERE artifact_id=?", (artifact_id,))
        return ArtifactRecord(**row) if row else None


def _for_update(tx: Tx) -> str:
    """Lock the row read in a transaction (PostgreSQL; SQLite's transaction is exclusive)."""
    return " FOR UPDATE" if tx.postgres else ""


def _event(kind: str, payload: str) -> JobEvent:
    return from_payload(kind, json.loads(payload))


def _progress(payload: str) -> Progress | None:
    return _event(Progress.kind, payload) if payload != "{}" else None
