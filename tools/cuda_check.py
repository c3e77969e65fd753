"""``make cuda-check``: compile every CUDA launcher (``csrc/cuda/*.cu``) for sm_90a on a machine
with nvcc but no GPU and no CUDA torch, and report registers, shared memory and spills.
``--archs pair`` adds sm_80; ``--archs wheel`` (``make cuda-check-all``) compiles for every
architecture of the wheel list (pyproject.toml's ``[tool.mmfuse] cuda-archs``); the default says
which of those it skips and why.

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

Fails (exit 1) on a compile error, a warning from our sources, or any spill.
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
ARCHS = ("sm_90a",)
# why the default skips the rest of the wheel list: nvcc runs its front end over torch's headers
# once per architecture (4 launchers x 2 archs took ~6 min of CI's 2 cores; the 6 of the wheel list
# measured 3.7x one arch on one launcher). sm_80 is compiled by `make test` already:
# tests/test_build.py builds every kernel body standalone for it, every instantiation, failing on a
# spill; and the kernels have no code path that differs above sm_80 (mma.cuh requires sm_80;
# nothing is Hopper- or Blackwell-only), so sm_86/sm_89/sm_100a/sm_120 compile the same code
SKIPPED_WHY = ("sm_80's kernels are compiled by make test (tests/test_build.py: every kernel body, every "
               "instantiation, spills fail); the others have no code path of their own above sm_80, and each "
               "architecture costs a full nvcc front-end pass per launcher: `make cuda-check-all` compiles them all")


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


def nvcc_command(nvcc: str, source: Path, include: Path, archs: tuple[str, ...] = ARCHS) -> list[str]:
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # the CPU torch has the same list

    gencode = [f"-gencode=arch={a.replace('sm_', 'compute_')},code={a}" for a in archs]
    return [
        nvcc, "-std=c++20", "-c", str(source), "-o", str(BUILD / (source.stem + ".o")),
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


def check_one(nvcc: str, source: Path, include: Path, archs: tuple[str, ...]) -> tuple[Path, int, str, float]:
    start = time.monotonic()
    result = subprocess.run(nvcc_command(nvcc, source, include, archs), capture_output=True, text=True, cwd=ROOT)
    return source, result.returncode, result.stdout + result.stderr, time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="*", type=Path, help="launchers to compile (default: csrc/cuda/*.cu)")
    parser.add_argument("--archs", default="ci",
                        help="ci: sm_90a (default); pair: sm_80 and sm_90a; wheel: every architecture of the wheel "
                             "list; or a comma-separated list (sm_86,sm_120)")
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
    named = {"ci": ARCHS, "pair": ("sm_80", "sm_90a")}
    archs = named.get(args.archs) or (wheel_archs() if args.archs == "wheel" else tuple(args.archs.split(",")))
    print(f"cuda-check: {len(sources)} launcher(s), {', '.join(archs)}, torch {version} headers (stable ABI, {torch_target_flag()[2:]}), "
          f"{subprocess.run([nvcc, '--version'], capture_output=True, text=True).stdout.strip().splitlines()[-1]}")
    skipped = [a for a in wheel_archs() if a not in archs]
    if skipped:
        print(f"cuda-check: skipping {', '.join(skipped)} of the wheel list: {SKIPPED_WHY}")

    failed = False
    rows = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for source, code, log, seconds in pool.map(lambda s: check_one(nvcc, s, include, archs), sources):
            name = source.relative_to(ROOT) if source.is_absolute() else source
            ours = [l for l in log.splitlines() if "warning" in l and str(ROOT / "csrc") in l]
            status = "ok" if code == 0 and not ours else "FAILED"
            print(f"  {name}: {status} ({seconds:.0f} s)")
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
    spilling = [r for r in rows if r["spill"] > 0]
    for r in spilling:
        print(f"cuda-check: {r['kernel']} spills {r['spill']} bytes on {r['arch']}", file=sys.stderr)
    if failed or spilling:
        return 1
    print(f"cuda-check: {len(sources)} launcher(s), {len(rows)} kernel compilations, no errors, no spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
