"""The one timing rule both benchmarks use: medians of interleaved rounds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def timed_together(fns: list[Callable[[], None]], device: torch.device, repeats: int) -> list[float]:
    """Median seconds of each function, measured in interleaved rounds so that a machine
    slowing down or speeding up mid-run shifts all of them alike."""
    for fn in fns:
        for _ in range(3):
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, samples):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            out.append(time.perf_counter() - start)
    return [statistics.median(s) for s in samples]
