"""Timing one callable: CUDA events on a GPU, a wall clock on the CPU; median of repeats."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, repeat: int = 15) -> float:
    """Median milliseconds of ``fn()`` after ``warmup`` calls.

    On CUDA, ``triton.testing.do_bench`` (events, cache flushed between runs) when Triton is
    installed, else CUDA events; on the CPU, ``time.perf_counter`` around each call.
    """
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except ImportError:
            return _cuda_events_ms(fn, warmup, repeat)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _cuda_events_ms(fn, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
