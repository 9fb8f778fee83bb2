"""Prometheus metrics of one service (its own registry, so several apps in one process stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("medfm_requests_total", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("medfm_request_seconds", "request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch = Histogram("medfm_batch_size", "images per micro-batched forward pass",
                               buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.in_flight = Gauge("medfm_in_flight", "requests being handled", registry=self.registry)
        self.rss = Gauge("medfm_resident_bytes", "resident memory of the service process",
                         registry=self.registry)

    def render(self) -> bytes:
        self.rss.set(resident_bytes())
        return generate_latest(self.registry)


def resident_bytes() -> int:
    """Resident set size from /proc (Linux); 0 elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
