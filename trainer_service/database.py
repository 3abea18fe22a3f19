"""Where the job store keeps its rows: SQLite under ``--data-dir`` (one replica, the default)
or PostgreSQL (``--database-url``, any number of replicas sharing one queue).

One SQL text serves both: ``?`` placeholders, portable statements, and types written in
SQLite's words (``REAL``, ``INTEGER``) that become ``DOUBLE PRECISION`` and ``BIGINT`` on
PostgreSQL. The schema is versioned: ``migrate`` brings an older database up to
``SCHEMA_VERSION`` at start (under an advisory lock, so replicas starting together migrate
once) and refuses a newer one.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from loraforge_core.settings import LEASE_SECONDS

log = logging.getLogger("loraforge.trainer.database")

SCHEMA_VERSION = 5
# MIGRATIONS[i] takes a database from version i to i + 1.
MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE IF NOT EXISTS jobs (
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
        )""",
        "CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at)",
        """CREATE TABLE IF NOT EXISTS events (
            job_id TEXT NOT NULL,
            sequence INTEGER NOT NULL,
            time REAL NOT NULL,
            kind TEXT NOT NULL,
            payload TEXT NOT NULL,
            PRIMARY KEY (job_id, sequence)
        )""",
        """CREATE TABLE IF NOT EXISTS artifacts (
            artifact_id TEXT PRIMARY KEY,
            job_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            global_step INTEGER NOT NULL,
            path TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS artifacts_by_job ON artifacts (job_id, global_step)",
    ],
    [  # leases: the replica that runs a job, until when, and a cancel asked of it
        "ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE jobs ADD COLUMN lease_expires_at REAL",
        "ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
    ],
    [  # the request id of the CreateJob call: its training process logs under it too
        "ALTER TABLE jobs ADD COLUMN request_trace TEXT NOT NULL DEFAULT ''",
    ],
    [  # the checkpoint whose evaluation scored best
        "ALTER TABLE jobs ADD COLUMN best_artifact_id TEXT NOT NULL DEFAULT ''",
    ],
    [  # where a checkpoint's resume state lies in the artifact store (its claim's own key)
        "ALTER TABLE artifacts ADD COLUMN resume_key TEXT NOT NULL DEFAULT ''",
    ],
]
assert len(MIGRATIONS) == SCHEMA_VERSION
NOTIFY_CHANNEL = "loraforge_jobs"
POOL_WAIT_S = 5.0  # the longest a call waits for a pooled connection (psycopg_pool: 30 s)
# How long the pool retries one lost connection before giving it up; the next call that finds
# no connection starts a fresh attempt. psycopg_pool's default (5 min) doubles the delay
# between attempts throughout: after a 15 s outage the next attempt came up to 16 s after the
# database was back, and every call meanwhile answered UNAVAILABLE.
RECONNECT_S = 2.0
_MIGRATION_LOCK = 0x6C6F7261  # "lora": one advisory lock id for all replicas


def unreachable(err: BaseException) -> bool:
    """Whether a job-store call failed because the database was away (restarting, failing
    over, its connections dropped, busy) or this replica was (the server ended a transaction
    it left idle past the lease), not because of what the call asked: worth a retry."""
    if isinstance(err, (sqlite3.OperationalError, ConnectionError, TimeoutError)):
        return True
    try:
        import psycopg
        from psycopg.errors import IdleInTransactionSessionTimeout
        from psycopg_pool import PoolTimeout
    except ImportError:  # pragma: no cover - psycopg is a dependency
        return False
    return isinstance(err, (psycopg.OperationalError, IdleInTransactionSessionTimeout, PoolTimeout))


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer loraforge."""


class Tx:
    """Statements on one connection; rows come back as dicts."""

    def __init__(self, connection: Any, postgres: bool) -> None:
        self.connection = connection
        self.postgres = postgres

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    def rows(self, sql: str, params: tuple | list = ()) -> list[dict[str, Any]]:
        cursor = self.connection.execute(self._sql(sql), params)
        if cursor.description is None:
            return []
        return [dict(row) for row in cursor.fetchall()]

    def one(self, sql: str, params: tuple | list = ()) -> dict[str, Any] | None:
        rows = self.rows(sql, params)
        return rows[0] if rows else None

    def run(self, sql: str, params: tuple | list = ()) -> int:
        """Execute; the number of rows changed."""
        return self.connection.execute(self._sql(sql), params).rowcount


class Database:
    """The connection(s) of one backend; see SqliteDatabase and PostgresDatabase."""

    postgres = False
    # Appended to a SELECT that claims a row: other replicas skip it instead of waiting.
    skip_locked = ""
    # The database's clock in seconds since the epoch, as SQL: leases are taken, renewed and
    # expired by it, so replicas whose own clocks differ still agree on them.
    now = "((julianday('now') - 2440587.5) * 86400.0)"
    url = ""

    def transaction(self) -> contextlib.AbstractContextManager[Tx]:
        raise NotImplementedError

    def read(self) -> contextlib.AbstractContextManager[Tx]:
        raise NotImplementedError

    def notify(self, tx: Tx, job_id: str) -> None:
        """Tell other replicas that ``job_id`` changed (delivered when ``tx`` commits)."""

    def listen(self, on_change: Callable[[str], None]) -> None:
        """Call ``on_change(job_id)`` (from another thread) when another replica changes a job."""

    def has_table(self, tx: Tx, name: str) -> bool:
        raise NotImplementedError

    def lock_for_migration(self, tx: Tx) -> None:
        """Hold off other replicas' migrations until ``tx`` ends."""

    def close(self) -> None:
        raise NotImplementedError


class SqliteDatabase(Database):
    """One connection in WAL mode, shared by the event loop and worker threads under a lock;
    write transactions are taken at once (BEGIN IMMEDIATE) so writers queue."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.url = f"sqlite:///{path}"
        self._lock = threading.RLock()
        self.connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.connection.row_factory = sqlite3.Row
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("PRAGMA synchronous=FULL")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self._lock:
            self.connection.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(self.connection, postgres=False)
                self.connection.execute("COMMIT")
            except BaseException:
                self.connection.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def read(self) -> Iterator[Tx]:
        with self._lock:
            yield Tx(self.connection, postgres=False)

    def has_table(self, tx: Tx, name: str) -> bool:
        found = tx.one("SELECT name FROM sqlite_master WHERE type='table' AND name=?", (name,))
        return found is not None

    def close(self) -> None:
        with self._lock:
            self.connection.close()


class PostgresDatabase(Database):
    """A pool of psycopg connections; each transaction or read takes one. Row locks and
    ``SKIP LOCKED`` let any number of replicas claim queued jobs, and LISTEN/NOTIFY carries
    "job changed" to the other replicas' watchers."""

    postgres = True
    skip_locked = " FOR UPDATE SKIP LOCKED"
    now = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"

    def __init__(
        self, url: str, *, max_connections: int = 8, name: str = "loraforge",
        stalled_transaction_s: float = LEASE_SECONDS,
    ) -> None:  # fmt: skip
        import psycopg
        from psycopg.conninfo import conninfo_to_dict
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool

        self.url = url
        self._psycopg = psycopg
        # What pg_stat_activity shows for this replica's sessions, unless the URL names one.
        self.application_name = conninfo_to_dict(url).get("application_name") or name
        self._stalled_ms = max(1, round(stalled_transaction_s * 1000))
        self.pool = ConnectionPool(
            url, min_size=1, max_size=max_connections, open=False, timeout=POOL_WAIT_S,
            reconnect_timeout=RECONNECT_S, name="loraforge", configure=self._configure,
            kwargs={"autocommit": True, "row_factory": dict_row,
                    "connect_timeout": int(POOL_WAIT_S),
                    "application_name": self.application_name},
        )  # fmt: skip
        try:
            self.pool.open(wait=True, timeout=30)
        except psycopg.OperationalError as err:
            self.pool.close()
            raise ConnectionError(f"cannot reach PostgreSQL at {redact(url)}: {err}") from err
        self._listener: threading.Thread | None = None
        self._closing = threading.Event()

    def _configure(self, connection: Any) -> None:
        """A session whose client stalls inside a transaction (a frozen or partitioned
        replica) is ended by the server after ``stalled_transaction_s``: its row locks would
        otherwise keep the job from every other replica's claim (``SKIP LOCKED``) for as long
        as the stall lasts, lease or no lease."""
        connection.execute(
            "SELECT set_config('idle_in_transaction_session_timeout', %s, false)",
            (str(self._stalled_ms),),
        )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self.pool.connection() as connection, connection.transaction():
            yield Tx(connection, postgres=True)

    @contextlib.contextmanager
    def read(self) -> Iterator[Tx]:
        with self.pool.connection() as connection:
            yield Tx(connection, postgres=True)

    def notify(self, tx: Tx, job_id: str) -> None:
        tx.run("SELECT pg_notify(?, ?)", (NOTIFY_CHANNEL, job_id))

    def listen(self, on_change: Callable[[str], None]) -> None:
        def run() -> None:
            while not self._closing.is_set():
                try:
                    with self._psycopg.connect(
                        self.url, autocommit=True, application_name=self.application_name
                    ) as connection:
                        connection.execute(f"LISTEN {NOTIFY_CHANNEL}")
                        while not self._closing.is_set():
                            for note in connection.notifies(timeout=1.0):
                                on_change(note.payload)
                except self._psycopg.Error as err:  # the database restarted: listen again
                    log.warning("listen connection lost; reconnecting", extra={"error": str(err)})
                    self._closing.wait(1.0)

        self._listener = threading.Thread(target=run, name="pg-listen", daemon=True)
        self._listener.start()

    def has_table(self, tx: Tx, name: str) -> bool:
        return tx.one("SELECT to_regclass(?) AS found", (name,))["found"] is not None

    def lock_for_migration(self, tx: Tx) -> None:
        tx.run("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))

    def close(self) -> None:
        self._closing.set()
        if self._listener is not None:
            self._listener.join(timeout=5)
        self.pool.close()


def redact(url: str) -> str:
    """A database URL without its password, for logs and errors."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def open_database(
    url: str, data_dir: Path, *, name: str = "loraforge", lease_s: float = LEASE_SECONDS
) -> Database:
    """``postgresql://...`` or empty (SQLite at ``data_dir/jobs.sqlite3``), migrated. On
    PostgreSQL, ``name`` is the sessions' application_name and a transaction left idle for
    ``lease_s`` (its replica stalled as long as it may) is ended by the server."""
    if url and not url.startswith(("postgresql://", "postgres://")):
        raise ValueError(f"--database-url must be postgresql://...; got {redact(url)!r}")
    db: Database = (
        PostgresDatabase(url, name=name, stalled_transaction_s=lease_s)
        if url
        else SqliteDatabase(data_dir / "jobs.sqlite3")
    )
    try:
        migrate(db)
    except BaseException:
        db.close()
        raise
    return db


def _ddl(statement: str, postgres: bool) -> str:
    if not postgres:
        return statement
    statement = re.sub(r"\bREAL\b", "DOUBLE PRECISION", statement)
    return re.sub(r"\bINTEGER\b", "BIGINT", statement)


def migrate(db: Database) -> int:
    """Bring the schema up to SCHEMA_VERSION; the version found before. A database without a
    version table but with a jobs table predates versioning: version 1."""
    with db.transaction() as tx:
        db.lock_for_migration(tx)
        tx.run("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = tx.one("SELECT version FROM schema_version")
        found = row["version"] if row else (1 if db.has_table(tx, "jobs") else 0)
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the job database ({redact(db.url)}) has schema version {found}, newer than "
                f"this server's {SCHEMA_VERSION}: upgrade this replica to the version the "
                "others run"
            )
        for version in range(found, SCHEMA_VERSION):
            for statement in MIGRATIONS[version]:
                tx.run(_ddl(statement, db.postgres))
        if row is None:
            tx.run("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        else:
            tx.run("UPDATE schema_version SET version=?", (SCHEMA_VERSION,))
    if found < SCHEMA_VERSION:
        log.info("job database migrated", extra={"from": found, "to": SCHEMA_VERSION})
    return found
