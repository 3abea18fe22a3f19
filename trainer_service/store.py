"""The persistent job store (SQLite, WAL): jobs, their event log and artifact records.

Every event gets the next sequence number of its job inside one transaction, so a watcher that
resumes after sequence N gets exactly the events it missed, also after a restart.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer_service.events import JobEvent, Progress, StateChange, from_payload, to_payload

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued", "running", "succeeded", "failed", "cancelled",
)  # fmt: skip
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
SQLITE_MAX_INTEGER = 2**63 - 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    request_id TEXT UNIQUE,
    state TEXT NOT NULL,
    method TEXT NOT NULL,
    base_model TEXT NOT NULL,
    tokens TEXT NOT NULL,
    num_images INTEGER NOT NULL,
    config TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    failure_reason TEXT NOT NULL DEFAULT '',
    progress TEXT NOT NULL DEFAULT '{}',
    final_artifact_id TEXT NOT NULL DEFAULT '',
    last_sequence INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    PRIMARY KEY (job_id, sequence)
);
CREATE TABLE IF NOT EXISTS artifacts (
    artifact_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    global_step INTEGER NOT NULL,
    path TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS artifacts_by_job ON artifacts (job_id, global_step);
"""


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


def _locked(method: Callable) -> Callable:
    """Serialise a method on the store's one connection (the event loop and worker threads
    share it; sqlite3 connections are not safe to use from two threads at once)."""

    @functools.wraps(method)
    def locked(self: JobStore, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class JobStore:
    def __init__(self, path: Path) -> None:
        self._lock = threading.RLock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)

    @_locked
    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction (taken at once, so concurrent writers queue)."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

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
    ) -> tuple[JobRecord, bool]:
        """Insert a QUEUED job; with a known request_id return that job instead (created=False).

        The request_id is looked up inside the inserting transaction, so two concurrent
        requests with one request_id create one job."""
        job_id = job_id or "job-" + uuid.uuid4().hex[:16]
        now = time.time()
        with self._transaction():
            existing = self.job_by_request(request_id) if request_id else None
            if existing is not None:
                return existing, False
            self.db.execute(
                "INSERT INTO jobs (job_id, request_id, state, method, base_model, tokens,"
                " num_images, config, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (job_id, request_id or job_id, QUEUED, method, base_model, json.dumps(tokens),
                 num_images, json.dumps(config), now),
            )  # fmt: skip
            self._append(job_id, StateChange(QUEUED), now)
        return self._existing(job_id), True

    def _row_to_job(self, row: sqlite3.Row) -> JobRecord:
        checkpoints = [
            r["artifact_id"] for r in self.db.execute(
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
        )  # fmt: skip

    @_locked
    def get_job(self, job_id: str) -> JobRecord | None:
        row = self.db.execute("SELECT * FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        return self._row_to_job(row) if row else None

    def _existing(self, job_id: str) -> JobRecord:
        job = self.get_job(job_id)
        assert job is not None, job_id
        return job

    @_locked
    def job_by_request(self, request_id: str) -> JobRecord | None:
        row = self.db.execute("SELECT * FROM jobs WHERE request_id=?", (request_id,)).fetchone()
        return self._row_to_job(row) if row else None

    @_locked
    def list_jobs(self, *, state: str | None, limit: int, offset: int) -> list[JobRecord]:
        where, params = ("WHERE state=?", [state]) if state else ("", [])
        rows = self.db.execute(
            f"SELECT * FROM jobs {where} ORDER BY created_at, job_id LIMIT ? OFFSET ?",
            (*params, limit, offset),
        )
        return [self._row_to_job(r) for r in rows]

    def jobs_in_state(self, state: str) -> list[JobRecord]:
        return self.list_jobs(state=state, limit=1_000_000, offset=0)

    @_locked
    def next_queued(self) -> JobRecord | None:
        row = self.db.execute(
            "SELECT * FROM jobs WHERE state=? ORDER BY created_at, job_id LIMIT 1", (QUEUED,)
        ).fetchone()
        return self._row_to_job(row) if row else None

    def set_state(self, job_id: str, state: str, reason: str = "") -> JobRecord:
        """Change state and log a state event, in one transaction."""
        now = time.time()
        with self._transaction():
            sets = ["state=?"]
            params: list[Any] = [state]
            if state == RUNNING:
                sets.append("started_at=COALESCE(started_at, ?)")
                params.append(now)
            if state in TERMINAL:
                sets += ["finished_at=?", "failure_reason=?"]
                params += [now, reason if state == FAILED else ""]
            self.db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE job_id=?", (*params, job_id))
            self._append(job_id, StateChange(state, reason), now)
        return self._existing(job_id)

    # ------------------------------------------------------------------ events
    def _append(self, job_id: str, event: JobEvent, now: float) -> int:
        payload = json.dumps(to_payload(event))
        sequence = self.db.execute(
            "UPDATE jobs SET last_sequence = last_sequence + 1 WHERE job_id=?"
            " RETURNING last_sequence", (job_id,),
        ).fetchone()[0]  # fmt: skip
        self.db.execute(
            "INSERT INTO events (job_id, sequence, time, kind, payload) VALUES (?,?,?,?,?)",
            (job_id, sequence, now, event.kind, payload),
        )
        if isinstance(event, Progress):
            self.db.execute("UPDATE jobs SET progress=? WHERE job_id=?", (payload, job_id))
        return sequence

    def append_event(self, job_id: str, event: JobEvent) -> int:
        with self._transaction():
            sequence = self._append(job_id, event, time.time())
        return sequence

    @_locked
    def events_after(self, job_id: str, after: int, limit: int = 500) -> list[EventRecord]:
        after = min(after, SQLITE_MAX_INTEGER)  # a client may send any uint64
        rows = self.db.execute(
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
    ) -> None:
        """Record an artifact (idempotent: a resumed job may report the same one again)."""
        with self._transaction():
            self.db.execute(
                "INSERT OR IGNORE INTO artifacts VALUES (?,?,?,?,?,?)",
                (artifact_id, job_id, kind, global_step, path, time.time()),
            )
            if final:
                self.db.execute(
                    "UPDATE jobs SET final_artifact_id=? WHERE job_id=?", (artifact_id, job_id)
                )

    @_locked
    def get_artifact(self, artifact_id: str) -> ArtifactRecord | None:
        row = self.db.execute(
            "SELECT * FROM artifacts WHERE artifact_id=?", (artifact_id,)
        ).fetchone()
        return ArtifactRecord(**dict(row)) if row else None


def _event(kind: str, payload: str) -> JobEvent:
    return from_payload(kind, json.loads(payload))


def _progress(payload: str) -> Progress | None:
    return _event(Progress.kind, payload) if payload != "{}" else None
