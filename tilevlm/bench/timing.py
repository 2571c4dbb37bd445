"""How the benches time a figure: untimed warm-ups, timed repeats, the median and the spread.

One home for tilevlm's bench (`measure.py`) and its peer runs (`peer_*.py`), so both sides of a
comparison are timed the same way; `timed_part` notes the machine's load around each part.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
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


def timed_part(results: dict[str, Any], key: str, fn: Callable[[], dict[str, Any]],
               progress: Callable[[str], None]) -> None:
    """results[key] = fn(), with the 1-minute load average before and after (shared machines)."""
    before = os.getloadavg()[0]
    progress(f"{key} ... (load average {before:.2f})")
    results[key] = {**fn(), "load_avg_before": round(before, 2),
                    "load_avg_after": round(os.getloadavg()[0], 2)}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"device": str(device), "device_name": name, "dtype": str(dtype).replace("torch.", ""),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version()}
