"""Builds mmfuse._C: the C++ CPU kernels always, the CUDA kernels when a CUDA torch and nvcc exist.

Environment: MMFUSE_SKIP_CUDA_BUILD=1 builds the CPU kernels only; MMFUSE_SANITIZE=address,undefined
builds them under ASan/UBSan (CPU only; `make cpu-sanitize`); TORCH_CUDA_ARCH_LIST picks
the GPU architectures (default when no GPU is visible: pyproject.toml's [tool.mmfuse] cuda-archs,
the wheel list; with a GPU visible, torch's default: that GPU's); MAX_JOBS caps parallel
compilation.

The version is mmfuse/__init__.py's with a local part naming the torch release and CUDA version
the extension is built against (``0.1.0+torch2.13cpu``, ``0.1.0+torch2.11cu130``), as
FlashAttention 2's release wheels do: the compiled ops link against torch's C++ symbols, so a
build serves that torch release only. ``mmfuse/_build.json``, written beside ``_C``, records the same, and
``mmfuse._extension`` compares it with the running torch before loading ``_C``. Install with `pip install --no-build-isolation .` so the installed torch is used. The CUDA
kernels need torch >= 2.8 (the fusion launcher uses `at::mm` with an fp32 output dtype).
"""
import glob
import json
import os
import platform
import re
import shutil
import sys

from setuptools import setup

NO_TORCH = """
mmfuse builds its C++/CUDA extension against the torch that is already installed, so torch is
deliberately not a build requirement: pip's isolated build environment would download a second,
multi-GB torch (a CUDA build, whatever you have) just to compile against it, and the result
could mismatch the torch you run. By default pip builds in such an isolated environment, which
does not see the torch you installed.

Install torch first (if it is not installed), then build without isolation:

    pip install torch                       # or the build you want (CPU, a CUDA version)
    pip install --no-build-isolation .      # likewise: pip wheel --no-build-isolation .
"""

try:
    import torch
except ModuleNotFoundError:
    sys.exit("error: mmfuse: torch is not importable in this build environment." + NO_TORCH)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME


HERE = os.path.dirname(os.path.abspath(__file__))


def _read(name: str) -> str:
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


def wheel_cuda_archs() -> str:
    """pyproject.toml's [tool.mmfuse] cuda-archs."""
    return re.search(r'^cuda-archs\s*=\s*"([^"]+)"', _read("pyproject.toml"), re.M).group(1)


def _torch_release() -> str:
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def _version(cuda: bool) -> str:
    base = re.search(r'^__version__ = "([^"]+)"', _read("mmfuse/__init__.py"), re.M).group(1)
    flavour = f"cu{torch.version.cuda.replace('.', '')}" if cuda else "cpu"
    return f"{base}+torch{_torch_release()}{flavour}"


def _build_record(cuda: bool) -> dict:
    """What ``mmfuse._extension`` checks the running torch against before it loads ``_C``."""
    return {"torch": torch.__version__, "torch_release": _torch_release(),
            "cuda": torch.version.cuda if cuda else None,
            "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST", "") if cuda else ""}


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension, then ``_build.json`` written beside the ``_C`` it built (the
    source tree for ``--inplace`` and editable installs, the build tree for a wheel), so a wheel
    build never rewrites the record of the in-place build next to it."""

    def run(self):
        super().run()
        target = os.path.join(os.path.dirname(self.get_ext_fullpath("mmfuse._C")), "_build.json")
        with open(target, "w", encoding="utf-8") as f:
            json.dump(_build_record(WITH_CUDA), f)
            f.write("\n")


def _want_cuda() -> bool:
    if os.environ.get("MMFUSE_SKIP_CUDA_BUILD") == "1":
        return False
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    return torch.version.cuda is not None and bool(nvcc)


def _openmp_flags() -> list[str]:
    # at::parallel_for is a header template: under torch's OpenMP backend its `#pragma omp
    # parallel` is compiled into our kernels, and without -fopenmp they silently run on one
    # thread. libgomp.so.1 is then the one torch already loaded.
    if platform.system() == "Linux" and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []


def _sanitizer_flags() -> list[str]:
    # MMFUSE_SANITIZE=address,undefined: the ASan/UBSan build of `make cpu-sanitize` (CPU kernels
    # only; load it with libasan preloaded into the interpreter, as tools/cpu_sanitize.sh does)
    wanted = os.environ.get("MMFUSE_SANITIZE", "")
    if not wanted:
        return []
    return ["-O1", "-g", f"-fsanitize={wanted}", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]


def _extension():
    sources = ["csrc/mmfuse.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    sanitize = _sanitizer_flags()
    cxx = (sanitize or ["-O3"]) + _openmp_flags()
    link = _openmp_flags() + [f for f in sanitize if f.startswith("-fsanitize")]
    if platform.machine() in ("x86_64", "AMD64"):
        # at::vec's AVX2 vectors for the attention softmax (every x86 CPU since 2013)
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    if _want_cuda() and not sanitize:
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", wheel_cuda_archs())
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        return CUDAExtension(
            "mmfuse._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=[os.path.join(HERE, "csrc")],  # "cuda/..._kernel.cuh", as tools/cuda_check.py has it
            define_macros=[("MMFUSE_WITH_CUDA", None), ("MMFUSE_CUDA_ARCHS", f'"{archs}"')],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link,
        )
    return CppExtension("mmfuse._C", sources, include_dirs=[os.path.join(HERE, "csrc")], extra_compile_args=cxx,
                        extra_link_args=link)


EXTENSION = _extension()
WITH_CUDA = any(name == "MMFUSE_WITH_CUDA" for name, _ in (EXTENSION.define_macros or []))
setup(
    version=_version(WITH_CUDA),
    ext_modules=[EXTENSION],
    cmdclass={"build_ext": BuildExt},
)
