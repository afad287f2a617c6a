"""Training on several processes: torchrun runs the same train() on every rank and the HF Trainer does DDP.

The calling process keeps everything but the optimizer steps. It writes what to train into a spec file, runs
`python -m torch.distributed.run ... -m training.rank_worker SPEC`, hands rank 0's Trainer events to its own
callbacks (the progress bar, a job's events) as they come over a local socket, and reads rank 0's result back.
Only global rank 0 writes anything that outlives the run (checkpoints, the adapter, the trainer log, the result),
and the caller publishes only after every rank has exited cleanly, so a killed or failed launch publishes nothing.

torchrun, accelerate and the Trainer do the distributed work (process groups, DDP, sharding the sampler's
batches across ranks, checkpoint state per rank). What is written by hand here is only what none of them does:
telling a parent process what rank 0's Trainer is doing, and turning a failed rank into one clear error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers.trainer_callback import TrainerCallback, TrainerControl, TrainerState

from core.atomic import read_json, write_json
from core.errors import ScalpelError

MAX_NPROC_ENV = "SCALPEL_MAX_NPROC_PER_NODE"
DEFAULT_MAX_NPROC = 8  # the GPUs of one node: a bound on what a request may ask for, not a measurement
FOLDER = "distributed"  # below the work folder: the spec, rank 0's result, failed ranks' errors, torchrun's log
SPEC_NAME, RESULT_NAME, LOG_NAME = "spec.json", "result.json", "torchrun.log"
STOP_GRACE_SECONDS = 8.0  # torchrun's SIGTERM ends the ranks; the job runner waits 10 s before its SIGKILL
EVENTS = ("on_train_begin", "on_step_end", "on_log", "on_save", "on_evaluate", "on_train_end")


class NodeDone(Exception):
    """Raised on a node other than node 0 once its ranks have finished: node 0 keeps and publishes the adapter."""


class Launch(BaseModel):
    """How many processes train: nproc_per_node on each of nnodes machines; global rank 0 runs on node 0.

    batch_size is per process (the HF convention), so one optimizer step sees
    batch_size x gradient_accumulation_steps x world_size examples.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    nproc_per_node: int = Field(1, ge=1)
    nnodes: int = Field(1, ge=1)
    node_rank: int = Field(0, ge=0)
    rdzv_endpoint: str | None = None  # HOST:PORT on node 0 that every node can reach (nnodes > 1)
    # An accelerate config file (FSDP, say): `accelerate launch` starts the ranks instead of torchrun, with the
    # counts above (they override the file's num_processes, num_machines and machine_rank).
    accelerate_config: str | None = None

    @model_validator(mode="after")
    def _nodes(self) -> Launch:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes {self.nnodes}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("several nodes need rdzv_endpoint, the HOST:PORT of node 0")
        return self

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def distributed(self) -> bool:
        """Whether the ranks run in processes of their own (several, or accelerate's, such as FSDP's)."""
        return self.world_size > 1 or self.accelerate_config is not None


def max_nproc_per_node() -> int:
    """The most processes per node a caller may ask for: $SCALPEL_MAX_NPROC_PER_NODE, else 8."""
    raw = os.environ.get(MAX_NPROC_ENV, "")
    try:
        return max(1, int(raw)) if raw.strip() else DEFAULT_MAX_NPROC
    except ValueError as exc:
        raise ScalpelError(f"{MAX_NPROC_ENV} must be a whole number, not {raw!r}", param=MAX_NPROC_ENV) from exc


def launch_settings(names: dict[str, str] | None = None, **fields: Any) -> Launch:
    """A validated Launch; a bad value is a ScalpelError naming the field as the caller spells it (`names`
    maps field names to flags, such as {"nproc_per_node": "--nproc-per-node"})."""
    names = names or {}

    def bad(field: str, message: str) -> ScalpelError:
        name = names.get(field, field)
        return ScalpelError(f"{name} {message}", param=name, code=f"invalid_{field}")

    def whole(field: str, low: int, high: int | None = None) -> int:
        value = fields.get(field, low)
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise bad(field, f"must be a whole number {span}, not {value!r}")
        return value

    limit = max_nproc_per_node()
    try:
        nproc = whole("nproc_per_node", 1, limit)
    except ScalpelError as exc:
        raise ScalpelError(f"{exc.message} ({MAX_NPROC_ENV} sets the limit)", param=exc.param, code=exc.code) from None
    nnodes = whole("nnodes", 1)
    node_rank = whole("node_rank", 0, nnodes - 1)
    endpoint = fields.get("rdzv_endpoint")
    if nnodes > 1 and not (isinstance(endpoint, str) and re.fullmatch(r"[^\s:]+:\d{1,5}", endpoint)):
        raise bad("rdzv_endpoint", f"must be HOST:PORT on node 0 when nnodes is {nnodes}, not {endpoint!r}")
    accelerate_config = fields.get("accelerate_config")
    if accelerate_config is not None:
        if not Path(accelerate_config).is_file():
            raise bad("accelerate_config", f"{accelerate_config!r}: no such file (an `accelerate config` YAML)")
        accelerate_config = str(Path(accelerate_config).resolve())
    return Launch(
        nproc_per_node=nproc,
        nnodes=nnodes,
        node_rank=node_rank,
        rdzv_endpoint=endpoint,
        accelerate_config=accelerate_config,
    )


def check_devices(launch: Launch) -> None:
    """On CUDA, every process of a node needs a GPU of its own (NCCL cannot share one between ranks)."""
    import torch

    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":  # the ranks inherit it: they train on the CPU, with gloo
        return
    if torch.cuda.is_available() and launch.nproc_per_node > torch.cuda.device_count():
        raise ScalpelError(
            f"nproc_per_node={launch.nproc_per_node}, but this node has {torch.cuda.device_count()} CUDA device(s)",
            param="nproc_per_node",
            code="invalid_nproc_per_node",
        )


# ----- inside a rank -----


def in_rank() -> bool:
    """Whether this process is a rank that torchrun (or `accelerate launch`) started."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its own machine under torchrun (0 outside it)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def fsdp_requested() -> bool:
    """Whether `accelerate launch` was given an FSDP config (it tells the ranks so through the environment)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def backend() -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


@dataclasses.dataclass
class RankSpec:
    """What every rank trains, as the launching process read it (plain JSON: typed again in rank_worker)."""

    config: dict  # TrainConfig.model_dump(mode="json")
    entry: dict  # dataclasses.asdict(ModelEntry)
    examples: list[dict]  # dataclasses.asdict(Example) each
    out_dir: str
    work_dir: str
    world_size: int = 1  # the processes the launch was asked for; a rank that finds another number stops
    eval_examples: list[dict] | None = None
    max_steps: int | None = None
    resume: bool = False
    init_adapter: str | None = None
    relay: str | None = None  # the launching process's socket; rank 0 connects to it

    def write(self, path: Path) -> None:
        write_json(path, dataclasses.asdict(self))  # a private file (0600), in the work folder

    @classmethod
    def read(cls, path: Path) -> RankSpec:
        data = read_json(path, "rank spec")
        if not isinstance(data, dict):
            raise ScalpelError(f"{path.name}: the rank spec must be a JSON object", param="spec")
        return cls(**data)


class RelayToParent(TrainerCallback):
    """Rank 0's Trainer events, sent to the launching process one at a time; each waits for the reply, so the
    parent's callbacks run while what they look at (a checkpoint folder, say) is still there. If the parent is
    gone the send fails and this rank stops: a dead launcher leaves no training running."""

    def __init__(self, address: str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address)
        self.conn = Connection(sock.detach())

    def send(self, message: dict) -> None:
        self.conn.send_bytes(json.dumps(message, default=str).encode())
        self.conn.recv_bytes()  # the parent's callbacks have run

    def _event(self, name: str, state: TrainerState, **extra: Any) -> None:
        self.send({"event": name, "state": dataclasses.asdict(state), **extra})

    def on_train_begin(self, args, state, control, **kwargs):
        self._event("on_train_begin", state)

    def on_step_end(self, args, state, control, **kwargs):
        self._event("on_step_end", state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._event("on_log", state, logs=logs or {})

    def on_save(self, args, state, control, **kwargs):
        self._event("on_save", state)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._event("on_evaluate", state, metrics=metrics or {})

    def on_train_end(self, args, state, control, **kwargs):
        self._event("on_train_end", state)

    def close(self) -> None:
        self.conn.close()


class LogToParent(logging.Handler):
    """Rank 0's warnings (truncated examples, say) reach the launching process's loggers, where a job records them."""

    def __init__(self, relay: RelayToParent):
        super().__init__(level=logging.INFO)
        self.relay = relay

    def emit(self, record: logging.LogRecord) -> None:
        message = {"log": {"name": record.name, "level": record.levelno, "message": record.getMessage()}}
        with contextlib.suppress(OSError, EOFError):  # the parent is gone: the next Trainer event stops this rank
            self.relay.send(message)


# ----- in the launching process -----


class Relay:
    """The launching process's end: a Unix socket in a private (0700) temporary folder, for rank 0 alone."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="scalpel-ddp-"))  # short: a socket path has ~100 bytes
        self.address = str(self.folder / "relay.sock")
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.address)
        self.server.listen(1)
        self.server.settimeout(0.2)

    def serve(self, proc: subprocess.Popen, callbacks: Sequence[TrainerCallback], args: Any) -> None:
        """Until torchrun exits: take rank 0's connection, run each event through `callbacks`, then reply.

        A callback that raises (a job's "the runner is gone") ends the launch: the caller stops torchrun."""
        conn: Connection | None = None
        done = False
        try:
            while proc.poll() is None:
                if done:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=0.5)
                    continue
                if conn is None:
                    try:
                        sock, _ = self.server.accept()
                    except TimeoutError:
                        continue
                    sock.setblocking(True)
                    conn = Connection(sock.detach())
                    continue
                if not conn.poll(0.2):
                    continue
                try:
                    message = json.loads(conn.recv_bytes())
                except (EOFError, OSError):  # rank 0 ended (or died): wait for torchrun to say how
                    done = True
                    continue
                _dispatch(message, callbacks, args)
                try:
                    conn.send_bytes(b"ok")
                except OSError:
                    done = True
        finally:
            if conn is not None:
                conn.close()

    def close(self) -> None:
        self.server.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _dispatch(message: dict, callbacks: Sequence[TrainerCallback], args: Any) -> None:
    if "log" in message:
        record = message["log"]
        logging.getLogger(record["name"]).log(record["level"], "%s", record["message"])
        return
    event = message.get("event")
    if event not in EVENTS:
        return
    state, control = TrainerState(**message["state"]), TrainerControl()
    extra = {k: message[k] for k in ("logs", "metrics") if k in message}
    for callback in callbacks:
        getattr(callback, event)(args, state, control, **extra)


def torchrun_command(launch: Launch, spec: Path) -> list[str]:
    """torchrun (as `python -m torch.distributed.run`, so it is this environment's) on rank_worker; or, with an
    accelerate config, `accelerate launch` (which runs torchrun itself, after setting up FSDP or DeepSpeed)."""
    if launch.accelerate_config is not None:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            f"--config_file={launch.accelerate_config}",
            f"--num_processes={launch.world_size}",
            f"--num_machines={launch.nnodes}",
            f"--machine_rank={launch.node_rank}",
        ]
        if launch.rdzv_endpoint:
            host, port = launch.rdzv_endpoint.rsplit(":", 1)
            cmd += [f"--main_process_ip={host}", f"--main_process_port={port}", "--rdzv_backend=static"]
        return [*cmd, "-m", "training.rank_worker", str(spec)]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={launch.nproc_per_node}"]
    if launch.nnodes == 1:
        cmd.append("--standalone")  # a rendezvous on a free local port: runs beside any other launch
    else:
        # Static rendezvous: global rank = node_rank x nproc_per_node + local rank, so rank 0 is on node 0,
        # where the launching process hears it and the adapter is kept.
        cmd += [
            f"--nnodes={launch.nnodes}",
            f"--node-rank={launch.node_rank}",
            "--rdzv-backend=static",
            f"--rdzv-endpoint={launch.rdzv_endpoint}",
        ]
    return [*cmd, "-m", "training.rank_worker", str(spec)]


def _rank_env(launch: Launch) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if "OMP_NUM_THREADS" not in env:  # torchrun would set 1; on a CPU the ranks share the cores instead
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // launch.nproc_per_node))
    return env


def _stop(proc: subprocess.Popen) -> None:
    """torchrun ends its ranks on SIGTERM (SIGTERM, then SIGKILL); torchrun itself is killed if it lingers."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_ranks(
    launch: Launch, spec: RankSpec, callbacks: Sequence[TrainerCallback] = (), args: Any = None
) -> dict | None:
    """Train `spec` on launch.world_size ranks and return rank 0's result (TrainResult.to_json), or None on a
    node other than node 0. A failed rank is a ScalpelError naming it; the Trainer's checkpoints stay in the
    work folder, so a later run with resume continues from the newest one."""
    folder = Path(spec.work_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for stale in [folder / RESULT_NAME, *folder.glob("error-*.json")]:  # an earlier, killed attempt's
        stale.unlink(missing_ok=True)
    relay = Relay() if launch.node_rank == 0 else None
    try:
        spec = dataclasses.replace(spec, relay=relay.address if relay else None, world_size=launch.world_size)
        spec.write(folder / SPEC_NAME)
        with open(folder / LOG_NAME, "ab") as out:
            log_start = out.tell()  # the log is kept across attempts; this attempt's part starts here
            proc = subprocess.Popen(
                torchrun_command(launch, folder / SPEC_NAME),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_rank_env(launch),
                cwd=str(Path(__file__).resolve().parents[1]),  # where `-m training.rank_worker` is found
                start_new_session=True,  # a Ctrl-C reaches us, and we stop torchrun (which stops its ranks)
            )
        try:
            if relay is not None:
                relay.serve(proc, callbacks, args)
            code = proc.wait()
        except BaseException:
            _stop(proc)
            raise
    finally:
        if relay is not None:
            relay.close()
    if code != 0:
        raise _failure(folder, code, launch, log_start)
    if launch.node_rank > 0:
        return None
    result = folder / RESULT_NAME
    if not result.is_file():
        raise ScalpelError("distributed training ended without rank 0's result", code="training_failed")
    data = read_json(result, "rank 0's result")
    assert isinstance(data, dict)
    return data


# torchrun's closing summary names the first rank that failed: "Root Cause ... rank : 1 ... exitcode : -9".
_ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.DOTALL)


def _failure(folder: Path, code: int, launch: Launch, log_start: int) -> ScalpelError:
    """One clear error for a failed launch, without a traceback or a path.

    torchrun's summary says which rank failed first; its own error (written by rank_worker: a ScalpelError keeps
    its code and param) is the message. A rank killed by a signal (out of memory, kill -9) wrote none, and the
    others then fail only because it is gone: the signal is the message."""
    errors: dict[int, dict] = {}
    for path in folder.glob("error-*.json"):
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
            errors[int(found["rank"])] = found
        except (OSError, ValueError, KeyError, TypeError):
            continue
    try:
        with open(folder / LOG_NAME, "rb") as f:
            f.seek(log_start)
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        text = ""
    first = _ROOT_CAUSE.search(text)
    where = f"rank {first.group(1)} of {launch.world_size}" if first else None
    if first and int(first.group(1)) in errors:
        error = errors[int(first.group(1))]
    elif first and int(first.group(2)) < 0:
        number = -int(first.group(2))
        name = signal.Signals(number).name if number in signal.valid_signals() else f"signal {number}"
        return ScalpelError(
            f"training failed: {where} was killed by {name} (out of memory, or killed from outside)",
            code="training_failed",
        )
    elif errors:
        error = min(errors.values(), key=lambda e: e.get("time", 0.0))  # the others usually failed because it did
        where = f"rank {error['rank']} of {launch.world_size}"
    else:
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        return ScalpelError(
            f"training failed: torchrun stopped ({how}) before any rank said why", code="training_failed"
        )
    return ScalpelError(
        f"training failed on {where}: {error['message']}",
        param=error.get("param"),
        code=error.get("code") or "training_failed",
    )
