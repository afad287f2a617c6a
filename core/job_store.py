"""Training jobs, their events and uploaded files in SQLite, so that state survives restarts."""

from __future__ import annotations

import builtins  # JobStore.list shadows the builtin in the class body's annotations
import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from core import paths
from core.errors import ConflictError, NotFoundError

FINAL = ("succeeded", "failed", "cancelled")
STATUSES = ("queued", "running") + FINAL

# The first shape of the database (user_version 0 or 1): stores made before the schema had a version have
# exactly these tables. Later changes are MIGRATIONS, applied in order, each in one transaction; the file's
# PRAGMA user_version says which it has.
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,              -- 'plan' (/api/training) or 'fine_tuning' (OpenAI)
    status TEXT NOT NULL,
    model TEXT NOT NULL,             -- the registered base
    adapter TEXT NOT NULL,           -- the adapter (store name) the job publishes a version of
    config TEXT NOT NULL,            -- the full TrainConfig as JSON
    training_file TEXT NOT NULL,     -- a path below SCALPEL_HOME
    validation_file TEXT,
    max_steps INTEGER,
    suffix TEXT,
    hyperparameters TEXT,            -- OpenAI's view of the config, as JSON
    fine_tuned_model TEXT,
    version TEXT,                    -- the published vN
    result TEXT,                     -- metrics, as JSON
    error TEXT,                      -- {message, code, param}, as JSON
    worker_pid INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    trained_tokens INTEGER,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES jobs(id),
    created_at REAL NOT NULL,
    level TEXT NOT NULL,             -- info, warn, error
    type TEXT NOT NULL,              -- message, metrics, checkpoint
    message TEXT NOT NULL,
    data TEXT                        -- JSON
);
CREATE INDEX IF NOT EXISTS events_by_job ON events(job_id, seq);
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    examples INTEGER NOT NULL,
    path TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""

MIGRATIONS: dict[int, str] = {
    # 2: the job list (newest first, by status) reads an index instead of scanning every job
    2: "CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs(status, created_at);",
    # 3, 4: who submitted a job or uploaded a file (a digest of the Bearer key), for per-key limits
    3: "ALTER TABLE jobs ADD COLUMN owner TEXT;",
    4: "ALTER TABLE files ADD COLUMN owner TEXT;",
}
SCHEMA_VERSION = max(MIGRATIONS)

_JSON_FIELDS = ("config", "hyperparameters", "result", "error")


@dataclass
class Job:
    id: str
    kind: str
    status: str
    model: str
    adapter: str
    config: dict
    training_file: str
    validation_file: str | None = None
    max_steps: int | None = None
    suffix: str | None = None
    hyperparameters: dict | None = None
    fine_tuned_model: str | None = None
    version: str | None = None
    result: dict | None = None
    error: dict | None = None
    worker_pid: int | None = None
    attempts: int = 0
    cancel_requested: bool = False
    trained_tokens: int | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    owner: str | None = None  # a digest of the submitter's key (serving.auth.Caller.owner), never the key

    @property
    def final(self) -> bool:
        return self.status in FINAL


@dataclass
class Event:
    seq: int
    job_id: str
    created_at: float
    level: str
    type: str
    message: str
    data: dict | None


@dataclass
class StoredFile:
    id: str
    filename: str
    purpose: str
    bytes: int
    examples: int
    path: str
    created_at: float
    owner: str | None = None


def job_dir(job_id: str) -> Path:
    """A job's private folder: its checkpoints and the worker's log. Kept until the job ends."""
    return paths.state_dir() / "jobs" / paths.check_name(job_id, "job")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class JobStore:
    """One SQLite file (WAL mode) shared by the server, the job runner and the worker processes.

    Every call opens its own short connection, so threads and processes never share one.
    """

    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else paths.state_dir() / "scalpel.db"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            self._migrate(db)

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Bring the file to SCHEMA_VERSION; several processes may open it at once, so each step re-reads the
        version inside its own write transaction."""
        while True:
            db.execute("BEGIN IMMEDIATE")
            try:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise ConflictError(
                        f"the job database {self.path.name} has schema version {version}, newer than this "
                        f"scalpel knows ({SCHEMA_VERSION}): upgrade scalpel",
                        code="job_store_too_new",
                    )
                if version == SCHEMA_VERSION:
                    db.execute("COMMIT")
                    return
                if version == 0:  # a new file, or one from before the schema had a version
                    for statement in SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute("PRAGMA user_version = 1")
                else:
                    db.execute(MIGRATIONS[version + 1])
                    db.execute(f"PRAGMA user_version = {version + 1}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def schema_version(self) -> int:
        with self._db() as db:
            return int(db.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=30, isolation_level=None)) as db:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout=30000")
            yield db

    # ----- jobs -----

    def create(self, job: Job) -> Job:
        row = {k: (json.dumps(v) if k in _JSON_FIELDS and v is not None else v) for k, v in vars(job).items()}
        row["cancel_requested"] = int(job.cancel_requested)
        with self._db() as db:
            db.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
        self.add_event(job.id, f"Created {job.kind.replace('_', '-')} job {job.id} for {job.adapter} on {job.model}")
        return job

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        values = dict(row)
        for k in _JSON_FIELDS:
            values[k] = json.loads(values[k]) if values[k] is not None else None
        values["cancel_requested"] = bool(values["cancel_requested"])
        return Job(**values)

    def get(self, job_id: str) -> Job:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no training job {job_id!r}", param="job_id", code="job_not_found")
        return self._job(row)

    def list(
        self, *, kind: str | None = None, status: str | None = None, limit: int = 100, after: str | None = None
    ) -> list[Job]:
        """Newest first; `after` is a job id to continue from (OpenAI's pagination)."""
        query, args = "SELECT * FROM jobs WHERE 1=1", []  # type: str, list[object]
        if kind:
            query, args = query + " AND kind = ?", args + [kind]
        if status:
            query, args = query + " AND status = ?", args + [status]
        if after:
            query += " AND rowid < (SELECT rowid FROM jobs WHERE id = ?)"
            args.append(after)
        query += " ORDER BY rowid DESC LIMIT ?"
        with self._db() as db:
            return [self._job(r) for r in db.execute(query, (*args, limit)).fetchall()]

    def update(self, job_id: str, *, expect: tuple[str, ...] | None = None, **fields) -> bool:
        """Set fields; with `expect`, only if the job's status is one of those (returns whether it changed)."""
        values = {k: (json.dumps(v) if k in _JSON_FIELDS and v is not None else v) for k, v in fields.items()}
        query = f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?"
        args = [*values.values(), job_id]
        if expect:
            query += f" AND status IN ({', '.join('?' * len(expect))})"
            args += list(expect)
        with self._db() as db:
            return db.execute(query, args).rowcount == 1

    def claim_next(self) -> Job | None:
        """The oldest queued job, marked running; two runners can never claim the same job."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT id FROM jobs WHERE status = 'queued' AND cancel_requested = 0 ORDER BY rowid LIMIT 1"
            ).fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            db.execute(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, "
                "started_at = COALESCE(started_at, ?) WHERE id = ?",
                (time.time(), row["id"]),
            )
            db.execute("COMMIT")
        return self.get(row["id"])

    def finish(self, job_id: str, status: str, *, message: str, level: str = "info", **fields) -> bool:
        """Move a job that is not yet final to a final status, with one event saying why."""
        assert status in FINAL
        changed = self.update(
            job_id, expect=("queued", "running"), status=status, finished_at=time.time(), worker_pid=None, **fields
        )
        if changed:
            self.add_event(job_id, message, level=level)
        return changed

    def request_cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        if job.final:
            raise ConflictError(f"job {job_id} is already {job.status}", param="job_id", code="job_finished")
        self.update(job_id, cancel_requested=1)
        # A queued job is cancelled here and now; a running one is stopped by the runner, which owns the worker.
        if self.update(job_id, expect=("queued",), status="cancelled", finished_at=time.time()):
            self.add_event(job_id, "Job cancelled before it started")
        else:
            self.add_event(job_id, "Cancellation requested; stopping the worker")
        return self.get(job_id)

    def delete(self, job_id: str) -> Job:
        """Remove a finished job and its events for good (a queued or running one must be cancelled first)."""
        job = self.get(job_id)
        if not job.final:
            raise ConflictError(
                f"job {job_id} is {job.status}; cancel it before deleting it", param="job_id", code="job_not_finished"
            )
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            db.execute("COMMIT")
        return job

    # ----- events -----

    def add_event(
        self, job_id: str, message: str, *, level: str = "info", type: str = "message", data: dict | None = None
    ) -> None:
        with self._db() as db:
            db.execute(
                "INSERT INTO events (job_id, created_at, level, type, message, data) VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, time.time(), level, type, message, json.dumps(data) if data is not None else None),
            )

    def events(
        self,
        job_id: str,
        *,
        after: int = 0,
        before: int | None = None,
        limit: int = 1000,
        type: str | None = None,
        newest_first: bool = False,
    ) -> builtins.list[Event]:
        """Events with after < seq (< before); `before` pages backwards, as OpenAI's event lists do."""
        query, args = "SELECT * FROM events WHERE job_id = ? AND seq > ?", [job_id, after]
        if before is not None:
            query, args = query + " AND seq < ?", args + [before]
        if type:
            query, args = query + " AND type = ?", args + [type]
        query += f" ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ?"
        with self._db() as db:
            rows = db.execute(query, (*args, limit)).fetchall()
        return [Event(**{**dict(r), "data": json.loads(r["data"]) if r["data"] else None}) for r in rows]

    # ----- files -----

    def add_file(self, f: StoredFile) -> StoredFile:
        with self._db() as db:
            db.execute(
                "INSERT INTO files (id, filename, purpose, bytes, examples, path, created_at, owner) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (f.id, f.filename, f.purpose, f.bytes, f.examples, f.path, f.created_at, f.owner),
            )
        return f

    def get_file(self, file_id: str) -> StoredFile:
        with self._db() as db:
            row = db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no file {file_id!r}", param="file_id", code="file_not_found")
        return StoredFile(**dict(row))

    def list_files(self, *, purpose: str | None = None) -> builtins.list[StoredFile]:
        query, args = "SELECT * FROM files", ()  # type: str, tuple[str, ...]
        if purpose:
            query, args = query + " WHERE purpose = ?", (purpose,)
        with self._db() as db:
            return [StoredFile(**dict(r)) for r in db.execute(query + " ORDER BY rowid DESC", args).fetchall()]

    def set_owner(self, *, job_id: str | None = None, file_id: str | None = None, owner: str | None) -> None:
        with self._db() as db:
            if job_id:
                db.execute("UPDATE jobs SET owner = ? WHERE id = ?", (owner, job_id))
            if file_id:
                db.execute("UPDATE files SET owner = ? WHERE id = ?", (owner, file_id))

    def owned(self, owner: str | None) -> tuple[int, int]:
        """(jobs queued or running, bytes of files stored) that `owner` submitted: what its limits count."""
        with self._db() as db:
            jobs = db.execute(
                "SELECT COUNT(*) FROM jobs WHERE owner IS ? AND status IN ('queued', 'running')", (owner,)
            ).fetchone()[0]
            stored = db.execute("SELECT COALESCE(SUM(bytes), 0) FROM files WHERE owner IS ?", (owner,)).fetchone()[0]
        return int(jobs), int(stored)

    def delete_file(self, file_id: str) -> StoredFile:
        found = self.get_file(file_id)
        with self._db() as db:
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        return found
