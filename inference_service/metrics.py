"""The generator's Prometheus metrics (served by loraforge_core.metrics on --metrics-port).

Gauges of state that lives elsewhere (queue, residency) are read when Prometheus scrapes;
counters and histograms are updated where the work happens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from loraforge_core.metrics import LATENCY_BUCKETS

if TYPE_CHECKING:
    from inference_service.adapters import AdapterRegistry

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
EVICTIONS = Counter(
    "loraforge_generator_adapter_evictions_total", "Resident adapters evicted to make room"
)


class GeneratorCollector(Collector):
    """Queue and residency, read at scrape time."""

    def __init__(
        self, waiting: Callable[[], int], running: Callable[[], int],
        adapters: Callable[[], AdapterRegistry | None],
    ) -> None:  # fmt: skip
        self.waiting, self.running, self.adapters = waiting, running, adapters

    def collect(self):
        yield GaugeMetricFamily(
            "loraforge_generator_requests_waiting", "Generate calls waiting for the pipeline",
            value=self.waiting(),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "loraforge_generator_requests_running", "Generate calls in the batch being denoised",
            value=self.running(),
        )  # fmt: skip
        registry = self.adapters()
        entries = registry.list() if registry is not None else []
        resident = sorted(e.adapter_id for e in entries if e.resident)
        yield GaugeMetricFamily(
            "loraforge_generator_adapters_resident", "Adapters loaded in the model",
            value=len(resident),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "loraforge_generator_adapters_pinned", "Adapters that are never evicted",
            value=sum(e.pinned for e in entries),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "loraforge_generator_adapters_outside_slots",
            "Resident adapters that took diffusers' general path (targets or a rank the slots "
            "lack: see --adapter-slot-targets and --adapter-slot-rank), whose loads are slower",
            value=sum(e.resident and registry.outside_slots(e) for e in entries),
        )  # fmt: skip
        # Like vLLM's lora_requests_info: which adapters this replica holds, for routers.
        yield InfoMetricFamily(
            "loraforge_generator_adapters", "The ids of the resident adapters",
            value={"resident": ",".join(resident), "max_resident": str(
                registry.max_resident if registry is not None else 0)},
        )  # fmt: skip
