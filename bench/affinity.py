"""Adapter-affine routing vs round robin over several generators.

3 generator processes (``--resident`` adapters each, the server's default 8) that can all load
any of 30 bundles by id; requests whose adapter popularity is skewed (Zipf, s=1.1), sent by the
client with affinity and then, on fresh servers, round robin: ``--warmup`` requests bring the
fleet to a steady state (a fleet that has been serving), then ``--requests`` more are measured.
Reports the adapter loads from the store during the measured requests (cold loads, from each
server's metrics) and their p50/p95 latency.

    python -m bench.affinity [--requests 300] [--warmup 300] [--resident 8] [--slot-rank 16]
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import statistics
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from loraforge_client import GeneratorClient

from bench.common import report
from loraforge_core.launch import ServerProcess, free_port
from loraforge_core.models import resolve_model
from trainer_service.training.lora import random_lora_bundle

LOADS = re.compile(r'^loraforge_generator_adapter_loads_total\{source="store"\} (\S+)$', re.M)


def store_loads(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        found = LOADS.search(r.read().decode())
    return float(found.group(1)) if found else 0.0


def run(
    mode: str, work: Path, store: Path, warmup: list[str], sequence: list[str],
    args: argparse.Namespace,
) -> tuple[float, list[float]]:  # fmt: skip
    """Cold loads and each request's latency (ms) over ``sequence``, on fresh servers that
    served ``warmup`` first."""
    with ExitStack() as stack:
        servers, ports = [], []
        for n in range(3):
            data = work / f"{mode}-{n}"
            shutil.copytree(store, data / "artifacts")
            ports.append(free_port())
            servers.append(stack.enter_context(ServerProcess(
                "generator", data_dir=data,
                extra_args=["--max-resident-adapters", str(args.resident),
                            "--metrics-port", str(ports[-1]),
                            "--adapter-slot-rank", str(args.slot_rank)],
            )))  # fmt: skip
        client = stack.enter_context(GeneratorClient(
            [s.target for s in servers], affinity=mode == "affinity", timeout=300))  # fmt: skip

        def serve(adapters: list[str]) -> list[float]:
            latencies = []
            for i, adapter in enumerate(adapters):
                started = time.perf_counter()
                client.generate("a circle", adapters=[(adapter, 1.0)], width=32, height=32,
                                steps=4, seed=i)  # fmt: skip
                latencies.append((time.perf_counter() - started) * 1000)
            return latencies

        serve(warmup)
        before = sum(store_loads(p) for p in ports)
        latencies = serve(sequence)
        return sum(store_loads(p) for p in ports) - before, latencies


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--resident", type=int, default=8, help="adapters each server holds")
    parser.add_argument("--adapters", type=int, default=30)
    parser.add_argument(
        "--slot-rank", type=int, default=16,
        help="the generators' --adapter-slot-rank; 0 loads through diffusers (slow loads)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-affinity-"))
    model = resolve_model("")
    ids = [random_lora_bundle(model, work / "store", seed=i).id for i in range(args.adapters)]
    rng = random.Random(0)
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(ids))]
    warmup = rng.choices(ids, weights=weights, k=args.warmup)
    sequence = rng.choices(ids, weights=weights, k=args.requests)
    results = {
        mode: run(mode, work, work / "store", warmup, sequence, args) for mode in ("affinity", "rr")
    }
    rows: list[tuple[str, float, str]] = []
    for mode, label in (("affinity", "affinity"), ("rr", "round robin")):
        loads, latencies = results[mode]
        cuts = statistics.quantiles(latencies, n=20)
        rows += [
            (
                f"{label}: cold adapter loads ({args.resident} resident x 3 replicas, "
                f"{len(ids)} adapters, {args.requests} requests after {args.warmup})",
                loads,
                "loads",
            ),
            (f"{label}: request latency p50", statistics.median(latencies), "ms"),
            (f"{label}: request latency p95", cuts[18], "ms"),
        ]
    (a_loads, a_lat), (r_loads, r_lat) = results["affinity"], results["rr"]
    rows += [
        ("  cold loads, affinity / round robin", a_loads / r_loads, "x"),
        ("  p95, affinity / round robin",
         statistics.quantiles(a_lat, n=20)[18] / statistics.quantiles(r_lat, n=20)[18], "x"),
    ]  # fmt: skip
    report(f"affinity-resident-{args.resident}-slot-rank-{args.slot_rank}", rows, args.out)


if __name__ == "__main__":
    main()
