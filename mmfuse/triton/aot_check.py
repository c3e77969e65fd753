"""Compile every Triton kernel of mmfuse for the GPUs we ship to, on any machine (``make triton-check``).

The interpreter (``TRITON_INTERPRET=1``, how CI runs the kernels) accepts programs that the GPU
compiler rejects and knows nothing of shared memory or registers. Triton's compiler itself needs
no GPU: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` lowers a kernel to
PTX and a cubin. For every case of every kernel module's ``aot_cases()`` table (the dtypes,
block sizes and autotune configs its launcher can launch with) and each of sm_80 and sm_90 this
compiles the kernel, reads the shared memory it needs, runs the ptxas that Triton ships with
``-v`` on the PTX for registers and spills, and records whether Hopper's warp-group MMA
(``wgmma``) is used. It prints one row per compilation and exits non-zero on a compile error or a
config whose shared memory exceeds the device's per-block limit; spills are reported.

It lives in the package, next to the tables it reads, so that ``python -m mmfuse.triton.aot_check``
runs from any checkout or installed wheel with nothing on ``sys.path`` but mmfuse.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings

import triton

from mmfuse.backends import triton_interpreted
from mmfuse.triton._aot import AotCase

KERNEL_MODULES = ("attention_backward", "attention_decode", "attention_kernels", "cross_attention", "fusion",
                  "mel_backward", "mel_spectrogram", "packing")
# compute capability -> the most dynamic shared memory one block may have (CUDA C Programming
# Guide, "Compute Capabilities": 163 KiB on sm_80, 227 KiB on sm_90)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
PTXAS_ARCH = {80: "sm_80", 90: "sm_90a"}  # Triton targets sm_90a on Hopper


@dataclasses.dataclass
class Compiled:
    """One (case, arch) compilation; ``error`` is set instead of the rest when it failed."""

    case: AotCase
    arch: int
    shared: int = 0
    registers: int = 0
    spill_bytes: int = 0
    wgmma: bool = False
    seconds: float = 0.0
    error: str | None = None

    def problems(self) -> list[str]:
        """Why this kernel cannot run as compiled, empty when it can."""
        if self.error is not None:
            return [f"does not compile: {self.error}"]
        found = []
        if self.shared > SHARED_LIMIT[self.arch]:
            found.append(f"needs {self.shared} bytes of shared memory, sm_{self.arch} allows {SHARED_LIMIT[self.arch]}")
        return found

    def warnings(self) -> list[str]:
        """What makes it slow but not wrong: spills. Reported, not failed: the autotuner times
        every kept config on the GPU and picks the fastest."""
        return [f"spills {self.spill_bytes} bytes to local memory"] if self.error is None and self.spill_bytes else []


def collect_cases(modules=KERNEL_MODULES) -> list[AotCase]:
    """Every kernel module's ``aot_cases()``, each distinct compilation once."""
    cases, seen = [], set()
    for name in modules:
        for case in importlib.import_module(f"mmfuse.triton.{name}").aot_cases():
            key = (case.name, tuple(case.signature.items()), repr(sorted(case.constexprs.items())),
                   case.num_warps, case.num_stages)
            if key not in seen:
                seen.add(key)
                cases.append(case)
    return cases


def compile_case(case: AotCase, arch: int) -> Compiled:
    """Compile ``case`` for compute capability ``arch`` (80, 90) and measure it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = case.kernel
    # constexprs keyed by argument index: the form every Triton 3.x ASTSource accepts
    constexprs = {(fn.arg_names.index(name),): value for name, value in case.constexprs.items()}
    # tensors are assumed 16-byte aligned, as torch allocates them: Triton specialises on it,
    # and the aligned program is the one that vectorises and pipelines loads through shared memory
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
             for name, ty in case.signature.items() if ty.startswith("*")}
    start = time.perf_counter()
    try:
        kernel = triton.compile(ASTSource(fn, case.signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": case.num_warps, "num_stages": case.num_stages})
    except Exception as e:  # noqa: BLE001 -- any compiler failure is the finding
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return Compiled(case, arch, error=f"{type(e).__name__}: {first_line}", seconds=time.perf_counter() - start)
    registers, spills = ptxas_usage(kernel.asm["ptx"], arch)
    wgmma = "wgmma" in kernel.asm["ptx"] or "warp_group_dot" in kernel.asm.get("ttgir", "")
    return Compiled(case, arch, kernel.metadata.shared, registers, spills, wgmma, time.perf_counter() - start)


_WORK: list[tuple[AotCase, int]] = []  # set before the worker processes fork: kernels do not pickle


def _compile(index: int) -> dict:
    """Compile ``_WORK[index]`` in a worker; the measurements without the (unpicklable) case."""
    result = compile_case(*_WORK[index])
    return {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.name != "case"}


def ptxas_path(arch: int) -> str:
    """The ptxas Triton compiles for ``arch`` with (its wheel's, or ``TRITON_PTXAS_PATH``)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        tool = get_ptxas(arch)  # Triton >= 3.5: a newer ptxas for sm_90 and up
    except (ImportError, TypeError):
        from triton import knobs

        tool = knobs.nvidia.ptxas
    return getattr(tool, "path", tool)


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spill store + load bytes) of the kernel in ``ptx``, from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas_path(arch), "-v", f"--gpu-name={PTXAS_ARCH[arch]}", src, "-o", src + ".o"],
                             capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return int(registers.group(1)), int(spills.group(1)) + int(spills.group(2))


_ROW = "{:<26} {:<10} {:<42} {:>5} {:>8} {:>5} {:>7} {:>6} {:>6} {}"


def report_row(result: Compiled) -> str:
    case = result.case
    if result.error is not None:
        return _ROW.format(case.name, case.label, case.config(), f"sm_{result.arch}", "-", "-", "-", "-",
                           f"{result.seconds:.1f}", "COMPILE ERROR")
    return _ROW.format(case.name, case.label, case.config(), f"sm_{result.arch}", result.shared, result.registers,
                       result.spill_bytes, "wgmma" if result.wgmma else "", f"{result.seconds:.1f}",
                       "; ".join(result.problems() + result.warnings()))


def summary(results: list[Compiled]) -> list[str]:
    """Per kernel and arch: compilations, the largest shared memory and register counts, wgmma use."""
    lines = []
    by_kernel: dict = {}
    for r in results:
        by_kernel.setdefault((r.case.name, r.arch), []).append(r)
    for (name, arch), rs in by_kernel.items():
        ok = [r for r in rs if r.error is None]
        wgmma = sum(r.wgmma for r in ok)
        lines.append(f"{name:<26} sm_{arch}: {len(rs)} compiled, max shared {max((r.shared for r in ok), default=0)} B, "
                     f"max regs {max((r.registers for r in ok), default=0)}, spilling {sum(bool(r.spill_bytes) for r in ok)}, "
                     f"wgmma in {wgmma}/{len(ok)}, failed {len(rs) - len(ok)}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmfuse.triton.aot_check", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SHARED_LIMIT),
                        help="compute capability to compile for (repeatable; default: all)")
    parser.add_argument("--kernel", action="append", help="only kernels whose name contains this (repeatable)")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)),
                        help="compilations run at once, in separate processes (default: MAX_JOBS or the core count)")
    args = parser.parse_args(argv)
    if triton_interpreted():
        print("aot_check: unset TRITON_INTERPRET: under the interpreter the launchers choose the interpreter's "
              "configs, not the GPU's", file=sys.stderr)
        return 2
    cases = [c for c in collect_cases() if not args.kernel or any(k in c.name for k in args.kernel)]
    archs = args.arch or sorted(SHARED_LIMIT)
    print(_ROW.format("kernel", "dtype", "config", "arch", "shared", "regs", "spill B", "mma", "sec", "problems"), flush=True)
    start, results = time.perf_counter(), []
    # Triton 3.9 warns once per process that its fp-fusion default will change; the launchers get the same default
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    _WORK[:] = [(case, arch) for case in cases for arch in archs]
    # the compiler is single-threaded: one process per core, forked so they inherit the cases
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs), mp_context=multiprocessing.get_context("fork")) as pool:
        for (case, _), measured in zip(_WORK, pool.map(_compile, range(len(_WORK)))):
            results.append(Compiled(case=case, **measured))
            print(report_row(results[-1]), flush=True)
    failed = [r for r in results if r.problems()]
    print(f"\n{len(results)} compilations ({len(cases)} cases x {len(archs)} archs) in {time.perf_counter() - start:.0f} s")
    print("\n".join(summary(results)))
    for r in failed:
        print(f"FAILED {r.case.name} [{r.case.label} {r.case.config()}] sm_{r.arch}: {'; '.join(r.problems())}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
