"""Build and load kernel test harnesses: on the host emulator (g++) or, on a GPU machine, with nvcc.

A harness is one C++/CUDA source (see ``tests/emulator/harness.h``) whose ``extern "C"`` entry
points take raw pointers and ``int64_t`` sizes and return 0, or nonzero with
``harness_last_error()`` set. :func:`load_harness` compiles it with g++ against
``csrc/emu/cuda_emu.h`` into ``build/emu/<name>-<hash>.so`` (the hash covers the source, the flags
and every header under ``csrc/``, so edits rebuild and reruns do not), and returns a
:class:`Harness` whose methods take CPU tensors (passed as their ``data_ptr()``), None (a null
pointer), ints (``int64_t``) and floats (``double``), and raise :class:`EmulatorError` when the entry point fails::

    prims = load_harness("primitives", HARNESS_DIR / "primitives.cu")
    prims.block_sum(x, sums, x.numel(), 97)

:func:`load_gpu_harness` builds the same source with nvcc for the visible GPU; its methods take
CUDA tensors.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
HARNESS_DIR = Path(__file__).resolve().parent / "emulator"
BUILD_DIR = ROOT / "build" / "emu"
LINKER_SCRIPT = CSRC / "emu" / "shared_memory.ld"

# -fdata-sections + the linker script gather static __shared__ variables for per-block poisoning;
# CUDA's `#pragma unroll` is unknown to g++ and harmless. -fno-gnu-unique: the emulator's inline
# variables stay private to each harness library (GNU-unique symbols are merged across every
# library in the process, RTLD_LOCAL or not).
EMULATOR_FLAGS = ("-x", "c++", "-std=c++20", "-O1", "-g0", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
                  "-fPIC", "-shared", "-fdata-sections", "-fno-gnu-unique", f"-Wl,-T,{LINKER_SCRIPT}")
# The sanitizer (csrc/emu/cuda_emu.h, EMU_SANITIZE): g++'s ThreadSanitizer instrumentation routes
# every load and store to the emulator's own __tsan_* entry points, so the objects are linked
# without libtsan (a separate link step); line tables name the accesses in reports.
SANITIZE_FLAGS = ("-DEMU_SANITIZE", "-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0", "-g1")
# MMFUSE_EMU_SANITIZE=1: every harness built with the sanitizer (make cuda-sanitize); the random
# warp order's seed, MMFUSE_EMU_SEED, is read at each launch.
SANITIZE = os.environ.get("MMFUSE_EMU_SANITIZE", "") == "1"


def source_line(path: Path, text: str, occurrence: int = 1) -> int:
    """The line number of the ``occurrence``-th line of ``path`` containing ``text``: tests name
    the lines that sanitizer reports must point at without hard-coding numbers."""
    hits = [n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line]
    if len(hits) < occurrence:
        raise LookupError(f"{text!r} occurs {len(hits)} times in {path.name}")
    return hits[occurrence - 1]


class EmulatorError(RuntimeError):
    """A harness entry point failed: a fault in the kernel (deadlock, bad launch, misuse)."""


def cuda_include_dir() -> Path:
    """The CUDA toolkit's include directory: its cuda_fp16.h / cuda_bf16.h also work under g++."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for home in filter(None, candidates):
        if (Path(home) / "include" / "cuda_runtime.h").is_file():
            return Path(home) / "include"
    raise FileNotFoundError("CUDA toolkit headers not found (set CUDA_HOME)")


def load_harness(name: str, source: str | Path, extra_flags: tuple[str, ...] = (), sanitize: bool | None = None,
                 include_first: Path | None = None) -> "Harness":
    """Compile ``source`` (a path, or the text of a harness) for the host emulator and load it.

    ``sanitize`` (default: ``MMFUSE_EMU_SANITIZE``) builds it with the emulator's race, bounds,
    alignment and initcheck sanitizer; ``include_first``: a directory searched before ``csrc``
    (mutated copies of kernel bodies).
    """
    text = Path(source).read_text() if isinstance(source, Path) else source
    sanitize = SANITIZE if sanitize is None else sanitize
    first = (f"-I{include_first}",) if include_first is not None else ()
    flags = (*EMULATOR_FLAGS, *first, f"-I{CSRC}", f"-I{HARNESS_DIR}", f"-I{cuda_include_dir()}", *extra_flags)
    if sanitize:
        flags = (*(f for f in flags if f != "-g0"), *SANITIZE_FLAGS)
    headers = tuple(sorted(include_first.rglob("*"))) if include_first is not None else ()
    # the copy's contents, not its (temporary) directory, name the build
    return _load(f"{name}-san" if sanitize else name, text, ("g++", *flags),
                 tuple(p.read_text() for p in headers if p.is_file()), first)


def load_gpu_harness(name: str, source: str | Path, extra_flags: tuple[str, ...] = ()) -> "Harness":
    """Compile ``source`` with nvcc for the current GPU's architecture and load it."""
    text = Path(source).read_text() if isinstance(source, Path) else source
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    flags = ("-x", "cu", "-std=c++17", "-O2", "-shared", "-Xcompiler", "-fPIC",
             f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-I{CSRC}", f"-I{HARNESS_DIR}", *extra_flags)
    return _load(f"{name}-sm{arch}", text, ("nvcc", *flags))


@functools.cache
def _load(name: str, text: str, command: tuple[str, ...], extra_texts: tuple[str, ...] = (),
          unhashed: tuple[str, ...] = ()) -> "Harness":
    digest = hashlib.sha256("\0".join((text, *(c for c in command if c not in unhashed), *extra_texts)).encode())
    for header in sorted([*CSRC.rglob("*.h"), *CSRC.rglob("*.cuh"), *CSRC.rglob("*.ld"), *HARNESS_DIR.glob("*.h")]):
        digest.update(header.read_bytes())
    library = BUILD_DIR / f"{name}-{digest.hexdigest()[:16]}.so"
    if not library.exists():
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        unit = library.with_suffix(".cu")
        staged = library.with_suffix(f".{os.getpid()}.cu")
        staged.write_text(text)
        os.replace(staged, unit)  # pytest-xdist workers may build the same harness at once
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        for step in _build_steps(command, unit, partial):
            result = subprocess.run(step, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"building harness {name} failed:\n{' '.join(step)}\n{result.stderr}")
        os.replace(partial, library)  # atomic: a concurrent run never loads a half-written library
    return Harness(ctypes.CDLL(str(library)), sanitized="-DEMU_SANITIZE" in command)


def _build_steps(command: tuple[str, ...], unit: Path, output: Path) -> list[list[str]]:
    """One compile-and-link command; with the sanitizer, compile then link without libtsan."""
    if "-fsanitize=thread" not in command:
        return [[*command, str(unit), "-o", str(output)]]
    link_only = {"-shared", f"-Wl,-T,{LINKER_SCRIPT}"}
    obj = output.with_suffix(".o")
    compile_step = [*(f for f in command if f not in link_only), "-c", str(unit), "-o", str(obj)]
    return [compile_step, [command[0], "-shared", "-fPIC", f"-Wl,-T,{LINKER_SCRIPT}", str(obj), "-o", str(output)]]


class Harness:
    """A loaded harness: ``harness.entry(*args)`` calls ``extern "C" int entry(...)``."""

    def __init__(self, library: ctypes.CDLL, sanitized: bool = False):
        self._library = library
        self.sanitized = sanitized
        library.harness_last_error.restype = ctypes.c_char_p

    def count_requests(self, on: bool = True):
        """Counting of bank passes and sectors per warp-wide request on (a sanitized harness)."""
        self._library.emu_set_counting(ctypes.c_int(int(on)))

    def request_counts(self) -> list["RequestCount"]:
        """What was counted since count_requests(), per (kernel, code site, shared or global)."""
        self._library.emu_counts.restype = ctypes.c_char_p
        rows = []
        for line in self._library.emu_counts().decode().splitlines():
            kernel, site, space, requests, passes, ideal = line.split("\t")
            rows.append(RequestCount(kernel, site, space, int(requests), int(passes), int(ideal)))
        return rows

    def __getattr__(self, entry: str):
        function = getattr(self._library, entry)
        function.restype = ctypes.c_int

        def call(*args):
            guarded = [_Guarded(a) if self.sanitized and isinstance(a, torch.Tensor) and a.numel() else a for a in args]
            for g in guarded:
                if isinstance(g, _Guarded):
                    g.register(self._library)
            try:
                status = function(*map(_c_argument, (g.inner if isinstance(g, _Guarded) else g for g in guarded)))
            finally:
                if self.sanitized:
                    self._library.emu_clear_redzones()
                for g in guarded:
                    if isinstance(g, _Guarded):
                        g.copy_back()
            if status != 0:
                raise EmulatorError(f"{entry}: {self._library.harness_last_error().decode()}")

        return call


@dataclasses.dataclass(frozen=True)
class RequestCount:
    """Warp-wide requests of one code site of a kernel: for shared memory, passes through the 32
    banks (ideal: one per 128 bytes requested); for global memory, 32-byte sectors touched (ideal:
    the bytes requested / 32)."""

    kernel: str
    site: str      # "file:line (function) <- ..." innermost first
    space: str     # "shared" or "global"
    requests: int
    passes: int    # shared: bank passes; global: sectors
    ideal: int

    @property
    def ratio(self) -> float:
        return self.passes / self.ideal if self.ideal else 1.0


class _Guarded:
    """A tensor argument copied between two redzones that the sanitizer watches (global bounds):
    the kernel gets the copy, and the tensor gets the copy's bytes back after the call if they
    changed."""

    REDZONE = 4096

    def __init__(self, tensor: torch.Tensor):
        if not tensor.is_contiguous():
            raise ValueError("harness arguments must be contiguous tensors")
        self.tensor = tensor
        nbytes = tensor.numel() * tensor.element_size()
        self.buffer = torch.full((nbytes + 2 * self.REDZONE,), 0xFF, dtype=torch.uint8)
        self.buffer[self.REDZONE:self.REDZONE + nbytes] = tensor.view(-1).view(torch.uint8)
        self.inner = self.buffer[self.REDZONE:self.REDZONE + nbytes]

    def register(self, library: ctypes.CDLL):
        for start in (self.buffer.data_ptr(), self.inner.data_ptr() + self.inner.numel()):
            library.emu_add_redzone(ctypes.c_void_p(start), ctypes.c_int64(self.REDZONE))
        library.emu_add_tensor(ctypes.c_void_p(self.inner.data_ptr()), ctypes.c_int64(self.inner.numel()))

    def copy_back(self):
        original = self.tensor.view(-1).view(torch.uint8)
        if not torch.equal(original, self.inner):  # untouched inputs keep their autograd version
            original.copy_(self.inner)


def _c_argument(value):
    if value is None:
        return ctypes.c_void_p(None)  # an optional pointer
    if isinstance(value, torch.Tensor):
        if not value.is_contiguous():
            raise ValueError("harness arguments must be contiguous tensors")
        return ctypes.c_void_p(value.data_ptr())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"harness arguments are tensors, None, ints and floats, got {type(value).__name__}")
    return ctypes.c_int64(value) if isinstance(value, int) else ctypes.c_double(value)
