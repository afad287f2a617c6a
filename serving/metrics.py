"""Prometheus metrics for one app (its own registry, so several apps in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes and friends
        r = self.registry
        self.requests = Counter("scalpel_requests", "HTTP requests", ["route", "status"], registry=r)
        self.tokens = Counter("scalpel_tokens", "Tokens processed", ["kind"], registry=r)
        self.latency = Histogram(
            "scalpel_request_seconds", "Request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.first_token = Histogram(
            "scalpel_time_to_first_token_seconds",
            "Time to the first streamed token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        switch = Histogram(
            "scalpel_adapter_switch_seconds",
            "Time to change the context's adapter set",
            buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.05, 0.1),
            registry=r,
        )
        engine.add_switch_listener(switch.observe)
        Gauge("scalpel_threads", "CPU threads llama.cpp decodes and evaluates prompts with", registry=r).set(
            engine.threads
        )
        Gauge("scalpel_queue_depth", "Requests waiting or running", registry=r).set_function(lambda: engine.queue.depth)
        Gauge("scalpel_loaded_adapters", "Adapters loaded in memory", registry=r).set_function(
            lambda: len(engine.loaded())
        )
        Gauge("scalpel_adapter_switches", "Times the context's adapter set changed", registry=r).set_function(
            lambda: engine.adapter_switches
        )
        Gauge("scalpel_cancelled_generations", "Generations stopped because the client left", registry=r).set_function(
            lambda: engine.cancelled_generations
        )

    def count_usage(self, usage: dict | None) -> None:
        if usage:
            self.tokens.labels("prompt").inc(usage["prompt_tokens"])
            self.tokens.labels("completion").inc(usage["completion_tokens"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
