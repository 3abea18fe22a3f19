"""Prometheus metrics: the HTTP endpoint and what every RPC reports.

Each server exposes its metrics on ``--metrics-port`` (0: none) at ``/metrics``, in the
``loraforge_`` namespace; the services' own metrics live beside their code
(``inference_service/metrics.py``, ``trainer_service/metrics.py``). Names follow Prometheus'
conventions (base units, ``_total`` counters) in the style of vLLM's and TGI's.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Histogram, start_http_server

log = logging.getLogger("loraforge.metrics")

# Seconds, from a health check to a long generation or a CreateJob with large images.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

RPC_DURATION = Histogram(
    "loraforge_rpc_duration_seconds",
    "Time from a call's arrival to its answer (streams: to their end), by RPC and status code",
    ["service", "rpc", "code"],
    buckets=LATENCY_BUCKETS,
)
RPC_STARTED = Counter(
    "loraforge_rpc_started_total", "Calls that arrived, by RPC", ["service", "rpc"]
)


def split_method(method: str) -> tuple[str, str]:
    """``/loraforge.v1.Generator/Generate`` -> ("Generator", "Generate")."""
    service, _, rpc = method.rpartition("/")
    return service.rsplit(".", 1)[-1], rpc


def serve_metrics(port: int, host: str) -> None:
    """Expose this process's metrics at http://host:port/metrics (a daemon thread)."""
    if port:
        start_http_server(port, addr=host)
        log.info("metrics endpoint", extra={"host": host, "port": port, "path": "/metrics"})
