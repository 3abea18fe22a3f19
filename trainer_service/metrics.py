"""The trainer's Prometheus metrics (served by loraforge_core.metrics on --metrics-port).

Jobs by state and the queue come from the job store when Prometheus scrapes (in a fleet every
replica reports the same shared counts: aggregate with max, not sum); the rest is this
replica's own work.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from trainer_service.events import Progress

JOB_DURATION = Histogram(
    "loraforge_trainer_job_duration_seconds",
    "From a job's first start to its end, by outcome (succeeded, failed, cancelled)",
    ["outcome"],
    buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800),
)
STEPS = Counter("loraforge_trainer_steps_total", "Training steps run on this replica")
CHECKPOINT_WRITE_SECONDS = Histogram(
    "loraforge_trainer_checkpoint_write_seconds",
    "Writing a checkpoint: resume state and bundle to local disk (write), then to the "
    "artifact store (publish)",
    ["stage"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
TAKEOVERS = Counter(
    "loraforge_trainer_takeovers_total",
    "Jobs this replica took over from a replica whose lease expired",
)


class TrainerCollector(Collector):
    """Jobs by state, the queue, and this replica's running jobs, read at scrape time."""

    def __init__(
        self,
        counts: Callable[[], dict[str, int]],
        running: Callable[[], dict[str, Progress | None]],
    ) -> None:
        self.counts, self.running = counts, running

    def collect(self):
        counts = self.counts()
        jobs = GaugeMetricFamily(
            "loraforge_trainer_jobs", "Jobs in the (shared) store, by state", labels=["state"]
        )
        for state in ("queued", "running", "succeeded", "failed", "cancelled"):
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        yield GaugeMetricFamily(
            "loraforge_trainer_queue_depth", "Jobs waiting for a replica to take them",
            value=counts.get("queued", 0),
        )  # fmt: skip
        running = self.running()
        yield GaugeMetricFamily(
            "loraforge_trainer_jobs_running_here", "Jobs this replica is training",
            value=len(running),
        )  # fmt: skip
        rate = GaugeMetricFamily(
            "loraforge_trainer_steps_per_second",
            "Each running job's recent training speed (its phase average)", labels=["job_id"],
        )  # fmt: skip
        for job_id, progress in running.items():
            if progress is not None:
                rate.add_metric([job_id], progress.steps_per_second)
        yield rate
