"""`scalpel jobs`: training jobs on a running server."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.errors import ScalpelError


def _jobs_client(args):
    from scalpel.jobs.client import JobsClient

    return JobsClient(args.url, args.api_key)


def cmd_jobs_start(args) -> None:
    client = _jobs_client(args)
    job = client.start(
        Path(args.config),
        Path(args.data),
        eval_data=Path(args.eval_data) if args.eval_data else None,
        model=args.model,
        max_steps=args.max_steps,
        preservation=args.preservation,
    )
    print(f"started {job['id']} ({job['adapter']} on {job['model']})")
    if args.watch:
        _finish_watch(client.watch(job["id"]))


def _finish_watch(job: dict) -> None:
    from scalpel.jobs.client import summary

    print(summary(job))
    if job["status"] != "succeeded":
        error = (job.get("error") or {}).get("message", job["status"])
        raise ScalpelError(f"job {job['id']} {job['status']}: {error}", code="job_" + job["status"])


def cmd_jobs_list(args) -> None:
    from scalpel.jobs.client import summary

    jobs = _jobs_client(args).list()
    print(json.dumps(jobs, indent=2) if args.json else "\n".join(summary(j) for j in jobs) or "no jobs")


def cmd_jobs_show(args) -> None:
    from scalpel.jobs.client import summary

    job = _jobs_client(args).get(args.job_id)
    print(json.dumps(job, indent=2) if args.json else summary(job))


def cmd_jobs_watch(args) -> None:
    _finish_watch(_jobs_client(args).watch(args.job_id))


def cmd_jobs_cancel(args) -> None:
    job = _jobs_client(args).cancel(args.job_id)
    print(f"{job['id']}: {job['status']}" + (" (stopping)" if job["status"] == "running" else ""))


def register(sub, threads: argparse.ArgumentParser) -> None:
    """Add this command group to the `scalpel` parser; `threads` is the shared --threads parent."""
    jobs = sub.add_parser("jobs", help="training jobs on a running server (scalpel serve)")
    jobs_sub = jobs.add_subparsers(dest="action", required=True)
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("--url", help="server URL (default: $SCALPEL_URL or http://127.0.0.1:8000)")
    connection.add_argument("--api-key", help="Bearer key (default: $SCALPEL_API_KEY)")
    start = jobs_sub.add_parser("start", parents=[connection], help="upload a dataset and start a job")
    start.add_argument("config", help="a plan-style training config (JSON)")
    start.add_argument("--data", required=True, help="knowledge file (uploaded to the server)")
    start.add_argument("--eval-data", help="evaluation file (uploaded to the server)")
    start.add_argument("--model", help="registered base to train on instead of the config's model_name")
    start.add_argument("--max-steps", type=int, help="cap training steps")
    start.add_argument(
        "--no-preservation",
        dest="preservation",
        action="store_false",
        help="train without base preservation (the base's own answers mixed into training; on by default)",
    )
    start.add_argument("--watch", action="store_true", help="follow the job with a progress bar")
    start.set_defaults(func=cmd_jobs_start)
    listing = jobs_sub.add_parser("list", parents=[connection], help="jobs, newest first")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_jobs_list)
    for action, func, text in (
        ("show", cmd_jobs_show, "one job"),
        ("watch", cmd_jobs_watch, "follow a job live"),
        ("cancel", cmd_jobs_cancel, "cancel a queued or running job"),
    ):
        one = jobs_sub.add_parser(action, parents=[connection], help=text)
        one.add_argument("job_id")
        if action == "show":
            one.add_argument("--json", action="store_true")
        one.set_defaults(func=func)
