"""`scalpel jobs`: start, list, watch and cancel training jobs on a running server, over its HTTP API."""

from __future__ import annotations

import builtins  # JobsClient.list shadows the builtin in the class body's annotations
import os
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from core.atomic import read_json
from core.errors import ScalpelError

DEFAULT_URL = "http://127.0.0.1:8000"


class JobsClient:
    """The plan's /api/training routes, plus /v1/files to hand a local dataset to the server."""

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 60):
        self.url = (url or os.environ.get("SCALPEL_URL") or DEFAULT_URL).rstrip("/").removesuffix("/v1")
        key = api_key or os.environ.get("SCALPEL_API_KEY")
        self.http = httpx.Client(
            base_url=self.url, timeout=timeout, headers={"Authorization": f"Bearer {key}"} if key else {}
        )

    def _call(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ScalpelError(
                f"cannot reach the scalpel server at {self.url} ({exc}); start it with `scalpel serve`, or pass --url",
                param="url",
                code="server_unreachable",
            ) from exc
        body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
        if response.status_code >= 400:
            error = body.get("error") or {}
            raise ScalpelError(
                error.get("message") or response.text,
                param=error.get("param"),
                code=error.get("code"),
                status=response.status_code,
            )
        return body

    def upload(self, path: Path) -> str:
        with open(path, "rb") as f:
            return self._call("POST", "/v1/files", files={"file": (Path(path).name, f)}, data={"purpose": "fine-tune"})[
                "id"
            ]

    def start(
        self,
        config: Path,
        data: Path,
        *,
        eval_data: Path | None = None,
        model: str | None = None,
        max_steps: int | None = None,
    ) -> dict:
        body = read_json(config, "config file")
        params: dict[str, str | int] = {"dataset": self.upload(data)}
        if eval_data:
            params["eval_dataset"] = self.upload(eval_data)
        if model:
            params["model"] = model
        if max_steps:
            params["max_steps"] = max_steps
        return self._call("POST", "/api/training/start", params=params, json=body)

    def list(self) -> list[dict]:
        return self._call("GET", "/api/training/jobs")["data"]

    def get(self, job_id: str) -> dict:
        return self._call("GET", f"/api/training/jobs/{job_id}")

    def events(self, job_id: str, after: int = 0) -> builtins.list[dict]:
        return self._call("GET", f"/api/training/jobs/{job_id}/events", params={"after": after})["data"]

    def cancel(self, job_id: str) -> dict:
        return self._call("POST", f"/api/training/jobs/{job_id}/cancel")

    def watch(self, job_id: str, *, poll: float = 1.0, echo=print) -> dict:
        """A live progress bar (steps, loss, lr, ETA) fed by the job's events, until the job ends."""
        after, bar = 0, None
        try:
            while True:
                for event in self.events(job_id, after):
                    after = event["seq"]
                    data = event.get("data") or {}
                    if event["type"] == "metrics" and data.get("total_steps"):
                        if bar is None:
                            bar = tqdm(total=data["total_steps"], desc=job_id, unit="step")
                        bar.n = data["step"]
                        bar.set_postfix(
                            {
                                k: f"{data[k]:.4g}"
                                for k in ("loss", "learning_rate", "tokens_per_second")
                                if data.get(k) is not None
                            },
                            refresh=True,
                        )
                    elif event["type"] != "metrics":
                        (bar.write if bar else echo)(f"[{event['level']}] {event['message']}")
                job = self.get(job_id)
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    return job
                time.sleep(poll)
        finally:
            if bar is not None:
                bar.close()


def summary(job: dict) -> str:
    progress = job.get("progress") or {}
    step = f"{progress.get('step', 0)}/{progress.get('total_steps', '?')}" if progress else "-"
    loss = f"{progress['loss']:.4f}" if progress.get("loss") is not None else "-"
    version = f"{job['adapter']}@{job['version']}" if job.get("version") else job["adapter"]
    return f"{job['id']}  {job['status']:<9}  step {step:<9}  loss {loss:<8}  {version} on {job['model']}"
