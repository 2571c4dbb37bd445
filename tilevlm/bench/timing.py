"""How the benches time a figure: untimed warm-ups, timed repeats, the median and the spread.

One home for tilevlm's bench (`tools/benchmark.py`) and its peer runs (`tools/peer_bench.py`),
so both sides of a comparison are timed the same way.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_runs(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device
               ) -> list[float]:
    """Wall times of `repeats` runs of fn(), after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of fn() over `repeats` runs, after `warmup` untimed runs."""
    return statistics.median(timed_runs(fn, repeats, warmup, device))


def spread(values: list[float]) -> list[float]:
    """[lowest, highest] of the timed runs' figures: the spread beside each median."""
    return [min(values), max(values)]
