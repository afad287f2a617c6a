"""The job database carries a schema version and upgrades the shape stores have today."""

from __future__ import annotations

import sqlite3

import pytest

from core import job_store
from core.errors import ConflictError
from core.job_store import Job, JobStore


def test_a_store_in_todays_shape_is_upgraded_and_keeps_its_jobs(tmp_path):
    path = tmp_path / "scalpel.db"
    with sqlite3.connect(path) as db:  # a database written before the schema had a version
        db.executescript(job_store.SCHEMA)
        db.execute(
            "INSERT INTO jobs (id, kind, status, model, adapter, config, training_file, created_at) "
            "VALUES ('job-old', 'plan', 'succeeded', 'tiny', 'a', '{}', 'data.json', 1.0)"
        )
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 0
    store = JobStore(path)
    assert store.schema_version() == job_store.SCHEMA_VERSION >= 2
    assert store.get("job-old").status == "succeeded"
    indexes = {row[1] for row in sqlite3.connect(path).execute("PRAGMA index_list(jobs)")}
    assert "jobs_by_status" in indexes
    assert JobStore(path).schema_version() == job_store.SCHEMA_VERSION  # opening again changes nothing


def test_a_new_store_starts_at_the_current_version(tmp_path):
    store = JobStore(tmp_path / "new.db")
    assert store.schema_version() == job_store.SCHEMA_VERSION
    store.create(
        Job(id="job-1", kind="plan", status="queued", model="m", adapter="a", config={}, training_file="d.json")
    )
    assert [j.id for j in store.list()] == ["job-1"]


def test_a_store_from_a_newer_scalpel_is_refused_by_name(tmp_path):
    path = tmp_path / "future.db"
    JobStore(path)
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {job_store.SCHEMA_VERSION + 1}")
    with pytest.raises(ConflictError, match="newer than this scalpel knows") as err:
        JobStore(path)
    assert str(tmp_path) not in err.value.message
