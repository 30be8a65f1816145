"""What both benchmarks share: their command-line options and one timing rule (medians of interleaved rounds)."""

from __future__ import annotations

import argparse
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


def parse_args(layers: int, repeats: int) -> argparse.Namespace:
    """``--device --layers --width --batch --repeats``; the defaults that differ are the caller's."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser.parse_args()
