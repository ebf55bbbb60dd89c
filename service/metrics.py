"""Prometheus metrics of one app instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send


@dataclass
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    jobs: Gauge
    queue_messages: Gauge
    broker_up: Gauge


def create_metrics() -> Metrics:
    registry = CollectorRegistry()
    return Metrics(
        registry=registry,
        requests=Counter("attrib_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry),
        latency=Histogram(
            "attrib_http_request_seconds", "HTTP request latency", ["method", "route"], registry=registry
        ),
        jobs=Gauge("attrib_jobs", "Jobs by status", ["status"], registry=registry),
        queue_messages=Gauge(
            "attrib_queue_messages", "Messages waiting in the broker, by queue (gpu, cpu)", ["queue"], registry=registry
        ),
        broker_up=Gauge("attrib_broker_up", "1 when the broker answered the last scrape, else 0", registry=registry),
    )


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def record_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(scope["method"], path, str(status["code"])).inc()
            self.metrics.latency.labels(scope["method"], path).observe(time.perf_counter() - started)
