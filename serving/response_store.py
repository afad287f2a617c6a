"""Stored /v1/responses answers for `previous_response_id` and GET/DELETE: SQLite under the state folder, bounded."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from core import paths
from core.errors import NotFoundError

KEEP = 1000  # the newest answers kept; older ones are dropped as new ones are stored
SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT,                      -- a digest of the caller's key (serving.auth.Caller.owner), or NULL
    created_at REAL NOT NULL,
    response TEXT NOT NULL,          -- the response object as the API answered it, JSON
    messages TEXT NOT NULL           -- the conversation up to and with this answer (no instructions), JSON
)
"""


@dataclass(frozen=True)
class StoredResponse:
    response: dict
    messages: list[dict]  # {"role", "content"}, the chat template's messages


class ResponseStore:
    """One SQLite file that survives restarts. Every call opens its own short connection, so threads never share one.

    A stored answer is seen only by the key that created it (the same owner; None without keys).
    """

    def __init__(self, path: Path | None = None, keep: int = KEEP):
        self.path = Path(path) if path else paths.state_dir() / "responses.db"
        self.keep = keep
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=30, isolation_level=None)) as db:
            db.execute("PRAGMA busy_timeout=30000")
            yield db

    def save(self, response: dict, messages: list[dict], owner: str | None) -> None:
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "INSERT OR REPLACE INTO responses (id, owner, created_at, response, messages) VALUES (?, ?, ?, ?, ?)",
                (response["id"], owner, time.time(), json.dumps(response), json.dumps(messages)),
            )
            db.execute(
                "DELETE FROM responses WHERE seq <= (SELECT MAX(seq) FROM responses) - ?",
                (self.keep,),
            )
            db.execute("COMMIT")

    def get(self, response_id: str, owner: str | None, param: str = "response_id") -> StoredResponse:
        """The stored answer, or a 404 naming `param` (the field or path parameter that gave the id)."""
        with self._db() as db:
            row = db.execute(
                "SELECT response, messages FROM responses WHERE id = ? AND owner IS ?", (response_id, owner)
            ).fetchone()
        if row is None:
            raise NotFoundError(
                f"no stored response {response_id!r} (answers given with store=false are not kept, "
                f"and only the newest {self.keep} are)",
                param=param,
                code="response_not_found",
            )
        return StoredResponse(json.loads(row[0]), json.loads(row[1]))

    def delete(self, response_id: str, owner: str | None) -> None:
        with self._db() as db:
            gone = db.execute("DELETE FROM responses WHERE id = ? AND owner IS ?", (response_id, owner)).rowcount
        if not gone:
            raise NotFoundError(f"no stored response {response_id!r}", param="response_id", code="response_not_found")
