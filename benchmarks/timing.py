"""What the benchmarks share: their command-line options, one timing rule (medians of interleaved rounds)
and the line that names the machine."""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import statistics
import time
from collections.abc import Callable

import torch


def timed_together(
    fns: list[Callable[[], None]], device: torch.device, repeats: int, *, collect: bool = False, warmup: int = 3
) -> list[float]:
    """Median seconds of each function, measured in interleaved rounds so that a machine
    slowing down or speeding up mid-run shifts all of them alike, after ``warmup`` untimed
    calls of each. A function faster than :data:`MIN_SAMPLE` is called several times in a
    row per sample, and the sample is their mean.

    ``collect=True`` keeps Python's garbage collector out of the timed regions: one
    ``gc.collect()`` before the rounds, and the collector paused while they run (a step that
    makes no reference cycles loses nothing). Collecting before every call instead would
    evict the caches each time: that made a tiny MLP's step measure 5x slower."""
    return [statistics.median(s) for s in timed_samples(fns, device, repeats, collect=collect, warmup=warmup)]


def timed_samples(
    fns: list[Callable[[], None]], device: torch.device, repeats: int, *, collect: bool = False, warmup: int = 3
) -> list[list[float]]:
    """:func:`timed_together`'s samples themselves: per function, seconds per call in each round."""
    paused = collect and gc.isenabled()
    if collect:
        gc.collect()
    if paused:
        gc.disable()
    try:
        return _rounds(fns, device, repeats, warmup)
    finally:
        if paused:
            gc.enable()


def paired_overhead(samples: list[float], base: list[float]) -> float:
    """The median over rounds of ``samples[r] − base[r]``: each difference is taken within one
    round, where both ran seconds apart, so a machine that drifts between rounds moves neither."""
    return statistics.median(s - b for s, b in zip(samples, base))


def ratio_interval(
    samples: list[float],
    base: list[float],
    loop: list[float],
    plain: list[float],
    *,
    level: float = 0.9,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """How far noise moves ``paired_overhead(samples, base) / paired_overhead(loop, plain)``: the
    central ``level`` of that ratio over ``resamples`` resamplings of the rounds (with replacement,
    the four series resampled together, so each round stays paired). A resampling where the loop
    measured no overhead has no ratio and is left out; NaNs when most are."""
    rounds = len(samples)
    draw = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        picked = [draw.randrange(rounds) for _ in range(rounds)]
        loop_over = statistics.median(loop[k] - plain[k] for k in picked)
        if loop_over > 0:
            ratios.append(statistics.median(samples[k] - base[k] for k in picked) / loop_over)
    if len(ratios) < resamples / 2:
        return float("nan"), float("nan")
    ratios.sort()
    tail = (1 - level) / 2
    return ratios[int(tail * (len(ratios) - 1))], ratios[int((1 - tail) * (len(ratios) - 1))]


# A sample lasts at least this long: a sub-millisecond step timed alone is mostly timer and
# scheduler jitter, so a fast function is called several times per sample and averaged.
MIN_SAMPLE = 0.01


def _rounds(fns: list[Callable[[], None]], device: torch.device, repeats: int, warmup: int) -> list[list[float]]:
    calls = []
    for fn in fns:
        for _ in range(warmup):
            fn()
        once = _sample(fn, device, 1)
        calls.append(max(1, min(1000, round(MIN_SAMPLE / max(once, 1e-9)))))
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, n, out in zip(fns, calls, samples):
            out.append(_sample(fn, device, n))
    return samples


def _sample(fn: Callable[[], None], device: torch.device, n: int) -> float:
    """Seconds per call of ``fn``, averaged over ``n`` calls in a row."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n


def machine(device: torch.device) -> str:
    """One line naming what the numbers were measured on: cores, load, threads, torch, the device.

    On a busy machine, torch's default of one thread per core waits on descheduled threads:
    the tiny MLP's step once measured 24 ms with 2 threads against 0.24 ms with 1."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                where = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    load = f", load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    return (
        f"machine: {os.cpu_count()} cores{load}, torch {torch.__version__} using {torch.get_num_threads()} threads, "
        f"python {platform.python_version()}, device {device} ({where})"
    )


def parse_args(layers: int, repeats: int) -> argparse.Namespace:
    """``--device --layers --width --batch --repeats``; the defaults that differ are the caller's."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser.parse_args()
