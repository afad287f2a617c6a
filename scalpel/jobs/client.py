"""`scalpel jobs`: start, list, watch and cancel training jobs on a running server, over its HTTP API."""

from __future__ import annotations

import builtins  # JobsClient.list shadows the builtin in the class body's annotations
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from httpx_sse import connect_sse
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

    def _unreachable(self, exc: Exception) -> ScalpelError:
        return ScalpelError(
            f"cannot reach the scalpel server at {self.url} ({exc}); start it with `scalpel serve`, or pass --url",
            param="url",
            code="server_unreachable",
        )

    @staticmethod
    def _raise(response: httpx.Response) -> None:
        """An error answer as a ScalpelError with the server's message, field and code."""
        body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
        error = body.get("error") or {}
        raise ScalpelError(
            error.get("message") or response.text,
            param=error.get("param"),
            code=error.get("code"),
            status=response.status_code,
        )

    def _call(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.status_code >= 400:
            self._raise(response)
        return response.json() if response.headers.get("content-type", "").startswith("application/json") else {}

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
        preservation: bool = True,
    ) -> dict:
        body = read_json(config, "config file")
        if not preservation:
            if not isinstance(body, dict):
                raise ScalpelError(f"{config.name}: a training config is a JSON object", param="config")
            body = {**body, "preservation": False}  # beside the config's fields: train without base preservation
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

    def follow(self, job_id: str) -> Iterator[dict]:
        """The job's events from its server-sent event stream, old ones first, until the job ends; a dropped
        connection is resumed from the last event seen (Last-Event-ID)."""
        last: str | None = None
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                with connect_sse(
                    self.http,
                    "GET",
                    f"/api/training/jobs/{job_id}/events",
                    headers=headers,
                    timeout=httpx.Timeout(30, read=None),
                ) as source:
                    if source.response.status_code >= 400:
                        source.response.read()
                        self._raise(source.response)
                    for sse in source.iter_sse():
                        if sse.data == "[DONE]":
                            return
                        if sse.data:
                            last = sse.id or last
                            yield json.loads(sse.data)
            except (httpx.RemoteProtocolError, httpx.ReadError):
                time.sleep(1)  # the server went away mid-stream: reconnect where we were
            except httpx.TransportError as exc:
                raise self._unreachable(exc) from exc

    def watch(self, job_id: str, *, echo=print) -> dict:
        """A live progress bar (steps, loss, lr, ETA) fed by the job's event stream, until the job ends."""
        bar, shown = None, {}
        try:
            for event in self.follow(job_id):
                data = event.get("data") or {}
                if event["type"] == "metrics" and data.get("total_steps"):
                    if bar is None:
                        # The steps done before the watch began start the bar (initial=), so they never count
                        # into its rate: a job replayed from its history is not shown at "50000 step/s".
                        bar = tqdm(total=data["total_steps"], initial=data["step"], desc=job_id, unit="step")
                    bar.update(data["step"] - bar.n)
                    # The loss stays on the bar between logging steps, and the final mean loss replaces it.
                    if data.get("train_loss") is not None:
                        shown["loss"] = f"{data['train_loss']:.4g}"
                    shown.update(
                        {
                            k: f"{data[k]:.4g}"
                            for k in ("loss", "learning_rate", "tokens_per_second")
                            if data.get(k) is not None
                        }
                    )
                    bar.set_postfix(shown, refresh=True)
                elif event["type"] != "metrics":
                    (bar.write if bar else echo)(f"[{event['level']}] {event['message']}")
        finally:
            if bar is not None:
                bar.close()
        return self.get(job_id)


def summary(job: dict) -> str:
    progress = job.get("progress") or {}
    step = f"{progress.get('step', 0)}/{progress.get('total_steps', '?')}" if progress else "-"
    # A finished job's last progress event is the Trainer's summary (train_loss): its result has the final loss.
    final = (job.get("result") or {}).get("final_loss")
    last = final if final is not None else progress.get("loss", progress.get("train_loss"))
    loss = f"{last:.4f}" if last is not None else "-"
    version = f"{job['adapter']}@{job['version']}" if job.get("version") else job["adapter"]
    return f"{job['id']}  {job['status']:<9}  step {step:<9}  loss {loss:<8}  {version} on {job['model']}"
