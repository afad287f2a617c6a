"""Runs queued training jobs, each in a worker process that it watches, cancels and restarts."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from core import paths
from core.job_store import Job, JobStore, job_dir

log = logging.getLogger("scalpel.jobs")


@dataclass
class RunnerSettings:
    max_concurrent: int = 1  # training uses every core; a second job would only slow the first
    max_attempts: int = 3  # a worker killed from outside (OOM, kill -9) is restarted from its checkpoint
    poll_seconds: float = 0.5
    stop_grace_seconds: float = 10.0


def _worker_alive(pid: int | None, job_id: str) -> bool:
    """Whether `pid` is still this job's worker (a pid is reused once its process is gone)."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"scalpel.jobs.worker" in cmdline and job_id.encode() in cmdline


class JobRunner:
    """The only place that starts or stops worker processes.

    State lives in the JobStore, so a runner that restarts picks up where the last one stopped: a job left
    'running' by a dead worker goes back to the queue and resumes from its newest checkpoint.
    """

    def __init__(self, store: JobStore, settings: RunnerSettings | None = None):
        self.store, self.settings = store, settings or RunnerSettings()
        self.workers: dict[str, subprocess.Popen] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----- lifecycle -----

    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="scalpel-jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop and the workers; their jobs go back to the queue and resume on the next start."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        for job_id, proc in list(self.workers.items()):
            self._terminate(proc)
            if self.store.update(job_id, expect=("running",), status="queued", worker_pid=None):
                self.store.add_event(job_id, "Server stopping: job paused, it resumes from its last checkpoint")
        self.workers.clear()

    def recover(self) -> None:
        """Jobs marked running whose worker is gone (the server or machine died) are queued again."""
        for job in self.store.list(status="running", limit=10_000):
            if job.id in self.workers or _worker_alive(job.worker_pid, job.id):
                continue
            self._worker_died(job, "the server restarted while it was running")

    # ----- the loop -----

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the loop must outlive any one bad job
                log.exception("job runner tick failed")
            self._stop.wait(self.settings.poll_seconds)

    def tick(self) -> None:
        """One pass: reap finished workers, honour cancellations, start queued jobs while there is room."""
        for job_id, proc in list(self.workers.items()):
            if proc.poll() is not None:
                del self.workers[job_id]
                self._reaped(self.store.get(job_id), proc.returncode)
            elif self.store.get(job_id).cancel_requested:
                self._terminate(proc)
        busy = len(self.workers)
        for job in self.store.list(status="running", limit=10_000):
            if job.id in self.workers:
                continue
            if job.worker_pid is not None and _worker_alive(job.worker_pid, job.id):  # an earlier server's worker
                busy += 1
                if job.cancel_requested:
                    os.kill(job.worker_pid, signal.SIGTERM)
            elif not (job := self.store.get(job.id)).final:  # re-read: it may have finished just now
                self._worker_died(job, "its worker is gone")
        while busy < self.settings.max_concurrent:
            claimed = self.store.claim_next()
            if claimed is None:
                break
            self._launch(claimed)
            busy += 1

    def _launch(self, job: Job) -> None:
        folder = job_dir(job.id)
        folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "SCALPEL_HOME": str(paths.home()), "PYTHONUNBUFFERED": "1"}
        with open(folder / "worker.log", "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "scalpel.jobs.worker", job.id],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(Path(__file__).resolve().parents[2]),
            )
        self.workers[job.id] = proc
        self.store.update(job.id, worker_pid=proc.pid)
        log.info("job %s: worker %d started (attempt %d)", job.id, proc.pid, job.attempts)

    def _terminate(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.settings.stop_grace_seconds)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _reaped(self, job: Job, returncode: int) -> None:
        if job.final:  # the worker recorded its own outcome
            return
        how = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        self._worker_died(job, f"its worker stopped ({how})")

    def _worker_died(self, job: Job, why: str) -> None:
        """A worker ended without recording an outcome: cancelled, to be resumed, or failed for good."""
        if job.cancel_requested:
            self.store.finish(job.id, "cancelled", message="Job cancelled; the adapter store is unchanged")
            shutil.rmtree(job_dir(job.id), ignore_errors=True)
            return
        if job.attempts >= self.settings.max_attempts:
            self.store.finish(
                job.id,
                "failed",
                level="error",
                message=f"Job failed: {why}, and it has already run {job.attempts} times",
                error={
                    "message": f"the worker died {job.attempts} times; last: {why}",
                    "code": "worker_died",
                    "param": None,
                },
            )
            return
        if self.store.update(job.id, expect=("running",), status="queued", worker_pid=None):
            self.store.add_event(job.id, f"Job interrupted: {why}. It resumes from its last checkpoint", level="warn")

    def cancel(self, job_id: str) -> Job:
        job = self.store.request_cancel(job_id)
        proc = self.workers.get(job_id)
        if proc is not None:
            threading.Thread(target=self._terminate, args=(proc,), daemon=True).start()
        return job
