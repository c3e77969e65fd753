"""Timing one callable: CUDA events on a GPU, a wall clock on the CPU; median of repeats."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, repeat: int = 15) -> float:
    """Median milliseconds of ``fn()`` after ``warmup`` calls.

    On CUDA, ``triton.testing.do_bench`` (events, cache flushed between runs) when Triton is
    installed, else CUDA events; on the CPU, ``time.perf_counter`` around each call, with the
    repeats cut to fit about ``CPU_BUDGET_S`` seconds (at least 5) for slow callables.
    """
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except ImportError:
            return _cuda_events_ms(fn, warmup, repeat)
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    per_call = (time.perf_counter() - start) / max(warmup, 1)
    # slow callables (the reference at the largest shapes) get fewer repeats, never under 5:
    # about CPU_BUDGET_S seconds per callable keeps a full run of every case short
    repeat = max(5, min(repeat, int(CPU_BUDGET_S / max(per_call, 1e-9))))
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


CPU_BUDGET_S = 2.0


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

