"""The generator's Prometheus metrics (served by loraforge_core.metrics on --metrics-port).

Gauges of state that lives elsewhere (queue, residency) are read when Prometheus scrapes;
counters and histograms are updated where the work happens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from loraforge_core.metrics import LATENCY_BUCKETS

DENOISING_STEPS = Counter(
    "loraforge_generator_denoising_steps_total",
    "Denoising steps run (one per step of a batch, whatever its size)",
)
IMAGES = Counter("loraforge_generator_images_total", "Images produced")
BATCH_REQUESTS = Histogram(
    "loraforge_generator_batch_requests",
    "Requests sharing one denoising batch",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16),
)
REJECTED = Counter(
    "loraforge_generator_requests_rejected_total",
    "Calls refused before they ran: queue_full (RESOURCE_EXHAUSTED) or draining (UNAVAILABLE)",
    ["reason"],
)
# How a request's adapter became usable: resident already, from the artifact store (the data
# dir or S3), or from bytes pushed with LoadAdapter.
ADAPTER_LOADS = Counter(
    "loraforge_generator_adapter_loads_total", "Adapters made usable, by source", ["source"]
)
ADAPTER_LOAD_SECONDS = Histogram(
    "loraforge_generator_adapter_load_seconds",
    "Time to make an adapter resident, by source",
    ["source"],
    buckets=LATENCY_BUCKETS,
)
# Adapters named by reference (hf://, https://, s3://: fetching.py), by source.
ADAPTER_FETCH_SECONDS = Histogram(
    "loraforge_generator_adapter_fetch_seconds",
    "Time to download an adapter file named by reference (cache misses), by source",
    ["source"],
    buckets=LATENCY_BUCKETS,
)
ADAPTER_FETCH_BYTES = Counter(
    "loraforge_generator_adapter_fetch_bytes_total",
    "Bytes of adapter files downloaded by reference, by source",
    ["source"],
)
ADAPTER_FETCH_CACHE = Counter(
    "loraforge_generator_adapter_fetch_cache_total",
    "References looked up: hit (on disk), miss (downloaded) or shared (waited for another "
    "request's download), by source",
    ["source", "result"],
)
ADAPTER_FETCH_FAILURES = Counter(
    "loraforge_generator_adapter_fetch_failures_total",
    "References refused or failed, by source and the rule (ErrorInfo reason) that refused",
    ["source", "rule"],
)
EVICTIONS = Counter(
    "loraforge_generator_adapter_evictions_total", "Resident adapters evicted to make room"
)


@dataclass(frozen=True)
class Residency:
    """The adapter registry as a scrape reads it."""

    resident: list[str]  # ids, sorted
    pinned: int
    outside_slots: int  # resident adapters on diffusers' general path
    max_resident: int


class GeneratorCollector(Collector):
    """Queue and residency, read at scrape time."""

    def __init__(
        self, waiting: Callable[[], int], running: Callable[[], int],
        residency: Callable[[], Residency | None],
    ) -> None:  # fmt: skip
        self.waiting, self.running, self.residency = waiting, running, residency

    def collect(self):
        yield GaugeMetricFamily(
            "loraforge_generator_requests_waiting", "Generate calls waiting for the pipeline",
            value=self.waiting(),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "loraforge_generator_requests_running", "Generate calls in the batch being denoised",
            value=self.running(),
        )  # fmt: skip
        residency = self.residency() or Residency([], 0, 0, 0)
        yield GaugeMetricFamily(
            "loraforge_generator_adapters_resident", "Adapters loaded in the model",
            value=len(residency.resident),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "loraforge_generator_adapters_pinned", "Adapters that are never evicted",
            value=residency.pinned,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "loraforge_generator_adapters_outside_slots",
            "Resident adapters that took diffusers' general path (targets or a rank the slots "
            "lack: see --adapter-slot-targets and --adapter-slot-rank), whose loads are slower",
            value=residency.outside_slots,
        )  # fmt: skip
        # Like vLLM's lora_requests_info: which adapters this replica holds, for routers.
        yield InfoMetricFamily(
            "loraforge_generator_adapters", "The ids of the resident adapters",
            value={"resident": ",".join(residency.resident),
                   "max_resident": str(residency.max_resident)},
        )  # fmt: skip
