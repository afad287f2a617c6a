"""`scalpel serve --replicas N`: the serving fleet on Ray Serve (serving.fleet), built from the server's settings.

Every replica runs the llama.cpp engine on the same registered base and reads the same SCALPEL_HOME, so on a
real cluster that folder is a shared filesystem mounted at the same path on every node.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from core import model_store, paths, threads
from core.errors import ScalpelError
from scalpel.serve import ServeSettings
from serving.app import create_app
from serving.engine import Engine
from serving.settings import AppSettings, EngineSettings

if TYPE_CHECKING:
    from ray.serve import Application

log = logging.getLogger("scalpel.serving")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
APP_NAME = "scalpel"
NAMESPACE = "scalpel"
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024  # requests and answers are small; Ray's default takes 30% of RAM
# Ray reads it when it is imported: "0" makes a Ray cluster started here use 127.0.0.1 for its node, so
# its own servers listen on loopback (Ray's single-machine mode; by default it picks the machine's address).
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Passed on to every replica: where the stores are, and that nothing is downloaded at run time.
PASSED_ENV = ("SCALPEL_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
# The ingress's router asks replicas for their queue length before it sends a request; a replica that misses
# the deadline (0.1 s by Ray's default, easily missed on a busy machine) is passed over, and a request for an
# adapter then goes to a replica without it, which loads it again. Waiting longer keeps adapters where they are.
ROUTER_ENV = {
    "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "1.0",
    "RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "5.0",
}


class FleetSettings(BaseModel):
    """How many replicas, on which Ray cluster, and how many adapter versions each keeps loaded."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    replicas: int = Field(2, ge=1, le=1024)
    # None: a Ray cluster started in this process, on 127.0.0.1. "auto" or HOST:PORT: a running cluster
    # (`ray start --head` on one node, `ray start --address HEAD:6379` on the others).
    ray_address: str | None = None
    max_adapters_per_replica: int = Field(3, ge=1, le=256)  # Ray's max_num_models_per_replica
    # CPUs Ray reserves for each replica, and its engine's threads. None: --threads / SCALPEL_THREADS when
    # set, else this machine's physical cores shared among the replicas (at least one each).
    cpus_per_replica: int | None = Field(None, ge=1)


@dataclass(frozen=True)
class Fleet:
    """A running fleet: where it answers, and how many replicas serve it."""

    base_url: str  # the OpenAI base URL, .../v1
    replicas: int
    threads: int  # each replica's engine threads
    local: bool  # on a Ray cluster this process started (stopped with it)


def replica_threads(settings: ServeSettings, fleet: FleetSettings) -> int:
    if fleet.cpus_per_replica is not None:
        return fleet.cpus_per_replica
    if settings.threads is not None:  # --threads, or SCALPEL_THREADS
        return threads.resolve(settings.threads)
    return max(threads.usable_cores() // fleet.replicas, 1)


def check(settings: ServeSettings) -> None:
    """Refuse the single server's settings that hold per-process state a fleet cannot share."""
    if settings.attach_on_load:
        raise ScalpelError(
            "attach_on_load is per server: with --replicas, name the adapter in each request's model",
            param="attach_on_load",
        )
    if settings.preload:
        raise ScalpelError(
            "with --replicas, adapters load on the replicas that get their requests (drop --adapter)",
            param="preload",
        )


def build_replica(model: str, engine: EngineSettings, app: AppSettings) -> tuple[Engine, FastAPI]:
    """One replica's engine and app, built in the replica's process (a Ray actor: no engine process of its own)."""
    paths.enforce_offline()
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)  # the app's JSON access lines, as `scalpel serve`'s
    served = Engine(model_store.get(model), engine)
    return served, create_app(served, app)


def application(settings: ServeSettings, fleet: FleetSettings) -> Application:
    """The Ray Serve application: the ingress and `fleet.replicas` replicas of the app."""
    from ray import serve

    from serving.fleet import Ingress, Replica

    check(settings)
    base = model_store.get(settings.model)  # refused here, before Ray starts anything, when not registered
    n_threads = replica_threads(settings, fleet)
    engine = settings.engine_settings().model_copy(update={"threads": n_threads})
    app = settings.app_settings()
    env = {"env_vars": {name: os.environ[name] for name in PASSED_ENV if name in os.environ}}
    env["env_vars"]["SCALPEL_HOME"] = str(paths.home())
    replica = serve.deployment(
        name="replica",
        num_replicas=fleet.replicas,
        ray_actor_options={"num_cpus": n_threads, "runtime_env": env},
        # Ray sends a replica no more than its engine admits (running plus waiting); more wait in Ray's
        # line, bounded in turn: beyond it the ingress answers 429 as the engine's full line does.
        max_ongoing_requests=engine.slots + engine.max_waiting,
        max_queued_requests=(engine.slots + engine.max_waiting) * fleet.replicas,
        health_check_period_s=2,
        health_check_timeout_s=30,
    )(Replica)
    router_env = {"env_vars": {**env["env_vars"], **{k: os.environ.get(k, v) for k, v in ROUTER_ENV.items()}}}
    ingress = serve.deployment(
        name="ingress",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0, "runtime_env": router_env},
        max_ongoing_requests=10_000,  # it only forwards: the bound is the replicas'
    )(Ingress)
    build = functools.partial(build_replica, base.name, engine, app)
    return ingress.bind(replica.bind(build, fleet.max_adapters_per_replica), base.name, app.max_body_bytes)


def start(settings: ServeSettings, fleet: FleetSettings) -> Fleet:
    """Connect to (or start) Ray, and run the fleet; returns once every replica is ready."""
    if fleet.ray_address is None:
        os.environ.setdefault(LOOPBACK_ENV, "0")  # before Ray is imported
    import ray
    from ray import serve

    app = application(settings, fleet)
    n_threads = replica_threads(settings, fleet)
    if fleet.ray_address is None:
        ray.init(
            num_cpus=max(os.cpu_count() or 1, fleet.replicas * n_threads),
            include_dashboard=False,
            namespace=NAMESPACE,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            configure_logging=False,
        )
        if ray.util.get_node_ip_address() not in ("127.0.0.1", "::1"):
            ray.shutdown()
            raise ScalpelError(
                f"the local Ray cluster would listen beyond loopback: Ray was imported before {LOOPBACK_ENV}=0 was "
                "set; start the fleet before anything imports ray, or start Ray yourself and pass --ray-address",
                param="ray_address",
            )
    else:
        ray.init(address=fleet.ray_address, namespace=NAMESPACE, configure_logging=False)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        # Ray's access lines are off: each replica's app writes one JSON line per request, as a single server does.
        serve.run(app, name=APP_NAME, route_prefix="/", logging_config={"enable_access_log": False})
    except BaseException as exc:
        stop(local=fleet.ray_address is None)
        if isinstance(exc, Exception) and not isinstance(exc, ScalpelError):  # Ray's message holds tracebacks
            raise ScalpelError(
                f"the fleet did not start ({type(exc).__name__}): the replicas' log lines above say why",
                param="replicas",
            ) from exc
        raise
    return Fleet(f"http://{settings.host}:{settings.port}/v1", fleet.replicas, n_threads, fleet.ray_address is None)


def stop(local: bool = True) -> None:
    """Take the fleet down and leave Ray: a local cluster stops with Ray Serve; on a shared cluster only this
    application is deleted, and whatever else Ray Serve runs there keeps running."""
    import ray
    from ray import serve

    if not ray.is_initialized():  # stopped already (a start that failed stops what it started)
        return
    try:
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()


def serve_fleet(settings: ServeSettings, fleet: FleetSettings) -> None:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        running = start(settings, fleet)
        log.info(
            "serving %s on %s with %d replicas of %d threads (Ray Serve)",
            settings.model,
            running.base_url,
            running.replicas,
            running.threads,
        )
        stopping.wait()
    finally:
        stop(local=fleet.ray_address is None)
