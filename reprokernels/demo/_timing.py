"""Step timing shared by the demos: warm-up, then the median of synchronised wall-clock steps."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_step_ms(step: Callable[[], None], device: torch.device, steps: int, warmup: int = 3) -> float:
    """Median milliseconds of ``step()`` over ``steps`` calls after ``warmup`` untimed ones (CUDA synchronised)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)
