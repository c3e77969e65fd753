"""Timing: CUDA events on a GPU, a wall clock on the CPU; median of repeats. On the CPU the
callables of one case are timed in interleaved rounds (A, B, C, A, B, C, ...), so that a slow
spell of a shared machine lands on every contender alike instead of on whichever ran then."""
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


def interleaved_median_ms(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int = 3,
                          repeat: int = 15) -> dict[str, float]:
    """``{name: median ms}`` of each callable. CPU: ``warmup`` calls each, then rounds that
    call each once (a callable that raises NotImplementedError in warmup is left out); the
    round count is cut to fit about ``CPU_BUDGET_S`` seconds per callable (at least 5). CUDA:
    :func:`median_ms` per callable (``do_bench`` flushes the cache around every call)."""
    if device.type == "cuda":
        out = {}
        for name, fn in fns.items():
            try:
                out[name] = median_ms(fn, device, warmup=warmup, repeat=repeat)
            except NotImplementedError:
                continue
        return out
    live, slowest = {}, 0.0
    for name, fn in fns.items():
        try:
            start = time.perf_counter()
            for _ in range(warmup):
                fn()
            slowest = max(slowest, (time.perf_counter() - start) / max(warmup, 1))
            live[name] = fn
        except NotImplementedError:
            continue
    rounds = max(5, min(repeat, int(CPU_BUDGET_S / max(slowest, 1e-9))))
    times = {name: [] for name in live}
    for _ in range(rounds):
        for name, fn in live.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}
