"""Timing helpers: medians after warm-up, ratios to a baseline measured in the same run."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def median_ms(fn: Callable[[], Any], *, repeat: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], *, repeat: int = 7, warmup: int = 1
) -> dict[str, float]:
    """Median ms of each function, timed round-robin so that a drift in the machine's speed
    (tens of percent over minutes on shared machines) hits every variant alike. Each round
    starts one variant later, so that no variant always runs first or after the same other
    one (what ran before leaves caches warm or cold: in the serving loops the A/A twin, always
    second, read 0.973-0.996x of the base it followed)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(repeat):
        start = round_ % len(names)
        for name in names[start:] + names[:start]:
            fn = fns[name]
            started = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def machine() -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
    }


def report(name: str, rows: list[tuple[str, float, str]], out: Path) -> None:
    """Print a table (label, value, unit or ratio note) and write it as JSON."""
    width = max(len(r[0]) for r in rows)
    print(f"\n== {name} ({machine()['device']}, {machine()['date']})")
    for label, value, unit in rows:
        print(f"{label:<{width}}  {value:>10.3f}  {unit}")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(
        json.dumps(
            {
                "machine": machine(),
                "rows": [{"name": r[0], "value": r[1], "unit": r[2]} for r in rows],
            },
            indent=2,
        )
    )
