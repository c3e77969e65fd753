"""``make cuda-check``: compile every CUDA launcher (``csrc/cuda/*.cu``) for every architecture of
the wheel list (pyproject.toml's ``[tool.mmfuse] cuda-archs``) on a machine with nvcc but no GPU and
no CUDA torch, and report registers, shared memory and spills per kernel and architecture.
``--archs sm_90a,sm_120`` compiles for a few. One nvcc per (launcher, architecture): sm_90a's
compiles the launcher whole (host code and kernels), the others the kernels alone (``-cubin``), so
the architecture-independent host pass runs once per launcher and two cores share the work.

The launchers are on the LibTorch stable ABI and build into the op library (``mmfuse/_ops.abi3.so``),
so they are compiled as ``setup.py`` compiles the op library's CUDA sources: torch's own
``COMMON_NVCC_FLAGS`` plus ours, ``-DTORCH_TARGET_VERSION`` (setup.py's ``TORCH_TARGET``, under
which ATen's and c10's headers refuse to be included), ``-DUSE_CUDA`` (setup.py adds it to the op
library's CUDA build, as torch's own CUDA build defines it: the stable shim declares
``aoti_torch_get_current_cuda_stream`` under it) and ``-DMMFUSE_WITH_CUDA``; no Python headers and
no ``TORCH_EXTENSION_NAME`` (torch's BuildExtension adds them to every extension; the op library
uses neither).
They include nothing CUDA-specific of torch (the stable and headeronly headers are the same in the
CPU and the CUDA wheel), so the installed torch's ``torch/include`` serves, CPU build or not: no
CUDA torch wheel is downloaded (the legacy launchers needed one, ~1 GB, for
``c10/cuda/impl/cuda_cmake_macros.h``).

Fails (exit 1) on a compile error, a warning from our sources, or a spill that ``KNOWN_SPILLS`` does
not allow (it allows none on sm_80..sm_90a).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "cuda-check"
# the architecture whose job also compiles the launchers' host code (nvcc -c); every other
# architecture's job compiles the kernels alone (nvcc -cubin), as the host code is the same for all
HOST_ARCH = "sm_90a"
# The default is every architecture of the wheel list: ptxas allocates registers per architecture,
# and kernels that fit sm_80 and sm_90a spilled on sm_100a and sm_120 (found by this check's first
# run over the whole list), so no architecture stands in for another.

# Spills that CUDA 13.0's ptxas makes on sm_100a and sm_120 and that we keep, (kernel, arch) ->
# the most bytes (stores + loads) allowed; a new spill, a bigger one, or any on sm_80..sm_90a fails.
# Found when this check first compiled the whole wheel list (2026-12-04). The elementwise ones spill
# at 40-57 registers of the 255 the launch bounds allow: not register pressure but values saved
# around the out-of-line slow paths of IEEE division and the fp64 libdevice functions, and moving
# the divisions (one per activation, the Whisper share hoisted out of the loop) only moved them to
# other instantiations; those paths run on special operands only. attention_forward_kernel
# <16-bit, 64, 64> on sm_120 (consumer Blackwell) keeps 168 registers, as on sm_90a, and spills 20
# bytes: the first kernel to retune when a sm_120 GPU measures it. None has run on such a GPU.
KNOWN_SPILLS = {
    ("attention::attention_forward_kernel<__nv_bfloat16, 64, 64>", "sm_120"): 20,
    ("attention::attention_forward_kernel<__half, 64, 64>", "sm_120"): 20,
    ("combine_backward_kernel<__nv_bfloat16, (CombineMode)2, true>", "sm_100a"): 16,
    ("combine_backward_kernel<__half, (CombineMode)2, true>", "sm_100a"): 16,
    ("combine_backward_kernel<__half, (CombineMode)1, true>", "sm_100a"): 28,
    ("combine_forward_kernel<double, (CombineMode)1, true>", "sm_100a"): 40,
    ("combine_backward_kernel<__nv_bfloat16, (CombineMode)2, true>", "sm_120"): 40,
    ("combine_backward_kernel<__half, (CombineMode)2, true>", "sm_120"): 40,
    ("whisper_grad_partial_kernel<double>", "sm_100a"): 28,
}


def wheel_archs() -> tuple[str, ...]:
    """pyproject.toml's cuda-archs as nvcc targets: "8.0;9.0a;12.0+PTX" -> sm_80, sm_90a, sm_120."""
    text = (ROOT / "pyproject.toml").read_text()
    listed = re.search(r'^cuda-archs\s*=\s*"([^"]+)"', text, re.M).group(1)
    return tuple("sm_" + a.replace("+PTX", "").replace(".", "") for a in listed.split(";"))
OUR_NVCC_FLAGS = ["-O3", "-lineinfo"]  # setup.py's extra_compile_args["nvcc"]


def torch_target_flag() -> str:
    """setup.py's TORCH_TARGET_FLAG: ``-DTORCH_TARGET_VERSION=0x020b000000000000`` for torch 2.11."""
    major, minor = re.search(r"^TORCH_TARGET = \((\d+), (\d+)\)", (ROOT / "setup.py").read_text(), re.M).groups()
    return f"-DTORCH_TARGET_VERSION=0x{int(major):02x}{int(minor):02x}000000000000"


def torch_headers() -> Path:
    """``torch/include`` of the installed torch (a CPU build serves: the launchers use the stable headers only)."""
    from torch.utils.cpp_extension import include_paths

    include = Path(include_paths()[0])
    if not (include / "torch" / "csrc" / "stable" / "library.h").exists():
        raise SystemExit(f"cuda-check: {include} has no stable-ABI headers (torch/csrc/stable/library.h)")
    return include


def nvcc_command(nvcc: str, source: Path, include: Path, archs: tuple[str, ...] = (HOST_ARCH,),
                 device_only: bool = False) -> list[str]:
    """The op library's nvcc line for ``source``. ``device_only``: one architecture's kernels alone
    (``-cubin``: cicc and ptxas, no host pass; the host code does not depend on the architecture)."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # the CPU torch has the same list

    gencode = [f"-gencode=arch={a.replace('sm_', 'compute_')},code={a}" for a in archs]
    output = BUILD / (f"{source.stem}.{archs[0]}.cubin" if device_only else f"{source.stem}.o")
    return [
        nvcc, "-std=c++20", "-cubin" if device_only else "-c", str(source), "-o", str(output),
        "-I", str(include), "-I", str(include / "torch" / "csrc" / "api" / "include"), "-I", str(ROOT / "csrc"),
        "-DMMFUSE_WITH_CUDA", "-DUSE_CUDA", torch_target_flag(), "-D_GLIBCXX_USE_CXX11_ABI=1", "-Xcompiler", "-fPIC", "-Xptxas", "-v", *gencode,
        *COMMON_NVCC_FLAGS, *OUR_NVCC_FLAGS,
    ]


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_USAGE = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> list[dict]:
    """One row per (kernel, arch) from ``ptxas -v``: registers, static smem, spill bytes."""
    rows, current = [], None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = {"kernel": m.group(1), "arch": m.group(2), "regs": 0, "smem": 0, "spill": 0}
            rows.append(current)
        elif current is not None and (m := _SPILL.search(line)):
            current["spill"] = int(m.group(1)) + int(m.group(2))
        elif current is not None and (m := _USAGE.search(line)):
            current["regs"] = int(m.group(1))
            current["smem"] = int(m.group(2) or 0)
    return rows


def demangle(names: list[str]) -> list[str]:
    if not names or shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def short(kernel: str) -> str:
    """``mmfuse::cuda::move_rows_kernel<float, true, false>(...)`` -> ``move_rows_kernel<float, true, false>``."""
    if kernel.endswith(")"):  # drop the parameter list: the last balanced (...) group
        depth = 0
        for i in range(len(kernel) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(kernel[i], 0)
            if depth == 0:
                kernel = kernel[:i]
                break
    return kernel.removeprefix("void ").replace("mmfuse::cuda::", "").replace("(anonymous namespace)::", "")


def check_one(nvcc: str, source: Path, include: Path, arch: str, device_only: bool) -> tuple[int, str, float]:
    start = time.monotonic()
    result = subprocess.run(nvcc_command(nvcc, source, include, (arch,), device_only), capture_output=True, text=True, cwd=ROOT)
    return result.returncode, result.stdout + result.stderr, time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="*", type=Path, help="launchers to compile (default: csrc/cuda/*.cu)")
    parser.add_argument("--archs", default="wheel",
                        help="wheel: every architecture of the wheel list (default); or a comma-separated list "
                             "(sm_90a,sm_120)")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))
    args = parser.parse_args(argv)

    import torch

    nvcc = shutil.which("nvcc") or (os.environ.get("CUDA_HOME", "/usr/local/cuda") + "/bin/nvcc")
    if not Path(nvcc).exists():
        print("cuda-check: nvcc not found (set CUDA_HOME or put nvcc on PATH)", file=sys.stderr)
        return 1
    sources = args.sources or sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    if not sources:
        print("cuda-check: no csrc/cuda/*.cu launchers to compile", file=sys.stderr)
        return 1
    version = torch.__version__
    include = torch_headers()
    BUILD.mkdir(parents=True, exist_ok=True)
    archs = wheel_archs() if args.archs == "wheel" else tuple(args.archs.split(","))
    host_arch = HOST_ARCH if HOST_ARCH in archs else archs[0]
    print(f"cuda-check: {len(sources)} launcher(s) x {len(archs)} architecture(s) ({', '.join(archs)}; host code "
          f"with {host_arch}), torch {version} headers (stable ABI, {torch_target_flag()[2:]}), "
          f"{subprocess.run([nvcc, '--version'], capture_output=True, text=True).stdout.strip().splitlines()[-1]}")
    left_out = [a for a in wheel_archs() if a not in archs]
    if left_out:
        print(f"cuda-check: not compiled for {', '.join(left_out)} of the wheel list (--archs)")

    # one nvcc per (launcher, architecture), the biggest launchers first so that two cores finish together
    jobs = sorted(((s, a, a != host_arch) for s in sources for a in archs), key=lambda j: -j[0].stat().st_size)
    failed = False
    rows = []
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        runs = pool.map(lambda j: check_one(nvcc, j[0], include, j[1], j[2]), jobs)
        for (source, arch, device_only), (code, log, seconds) in zip(jobs, runs):
            name = source.relative_to(ROOT) if source.is_absolute() else source
            ours = [l for l in log.splitlines() if "warning" in l and str(ROOT / "csrc") in l]
            status = "ok" if code == 0 and not ours else "FAILED"
            print(f"  {name} {arch}{' (kernels only)' if device_only else ''}: {status} ({seconds:.0f} s)")
            if code != 0 or ours:
                failed = True
                print("\n".join(l for l in log.splitlines() if "ptxas info" not in l and "bytes stack frame" not in l)[-6000:])
            kernels = parse_ptxas(log)
            for row, pretty in zip(kernels, demangle([r["kernel"] for r in kernels])):
                row["kernel"], row["file"] = short(pretty), str(name)
                rows.append(row)

    if rows:
        width = max(len(r["kernel"]) for r in rows)
        print(f"\n  {'kernel':<{width}}  arch     regs  smem B  spill B")
        for r in sorted(rows, key=lambda r: (r["file"], r["kernel"], r["arch"])):
            print(f"  {r['kernel']:<{width}}  {r['arch']:<7} {r['regs']:>5} {r['smem']:>7} {r['spill']:>8}")
    known = [r for r in rows if 0 < r["spill"] <= KNOWN_SPILLS.get((r["kernel"], r["arch"]), 0)]
    spilling = [r for r in rows if r["spill"] > KNOWN_SPILLS.get((r["kernel"], r["arch"]), 0)]
    for r in known:
        print(f"cuda-check: known spill (KNOWN_SPILLS): {r['kernel']} spills {r['spill']} bytes on {r['arch']}")
    for r in spilling:
        allowed = KNOWN_SPILLS.get((r["kernel"], r["arch"]))
        print(f"cuda-check: {r['kernel']} spills {r['spill']} bytes on {r['arch']}"
              + (f" (KNOWN_SPILLS allows {allowed})" if allowed else ""), file=sys.stderr)
    if failed or spilling:
        return 1
    print(f"cuda-check: {len(sources)} launcher(s) x {len(archs)} architecture(s), {len(rows)} kernel compilations, "
          f"no errors, no spill but the {len(known)} known, {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
