"""Builds mmfuse's op library: the C++ CPU kernels always, the CUDA kernels when a CUDA torch and nvcc exist.

Environment: MMFUSE_SKIP_CUDA_BUILD=1 builds the CPU kernels only; MMFUSE_SANITIZE=address,undefined
builds them under ASan/UBSan (CPU only; `make cpu-sanitize`); TORCH_CUDA_ARCH_LIST picks
the GPU architectures (default when no GPU is visible: pyproject.toml's [tool.mmfuse] cuda-archs,
the wheel list; with a GPU visible, torch's default: that GPU's); MAX_JOBS caps parallel
compilation.

Two extensions. ``mmfuse/_ops.abi3.so``, the op library: every kernel and the op schemas, on the
LibTorch stable ABI (``csrc/stable.h``) with ``TORCH_TARGET_VERSION`` = torch 2.11, so it calls
torch only through the stable C shims and loads, through ``torch.ops.load_library``, in every
torch from 2.11 on, whichever of them compiled it. ``mmfuse._C``: pybind11 only, the build
information for Python, no torch symbol. Every kernel source (csrc/cpu/*.cpp, csrc/cuda/*.cu)
registers with ``STABLE_TORCH_LIBRARY_IMPL``; ``tools/check_abi.py`` checks the built library.

The version is mmfuse/__init__.py's with a local part naming the kernels' flavour, ``+cpu`` or
``+cu130`` (the CUDA major.minor the CUDA kernels were compiled with; the library links the CUDA
runtime of that major version). ``mmfuse/_build.json``, written beside ``_C``, records the same,
and ``mmfuse._extension`` checks the running torch against it before loading the op library.
Install with `pip install --no-build-isolation .` so the installed torch is used.
"""
import glob
import json
import os
import platform
import re
import shutil
import sys

from setuptools import Extension, setup

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
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME, include_paths


HERE = os.path.dirname(os.path.abspath(__file__))


def _read(name: str) -> str:
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


def wheel_cuda_archs() -> str:
    """pyproject.toml's [tool.mmfuse] cuda-archs."""
    return re.search(r'^cuda-archs\s*=\s*"([^"]+)"', _read("pyproject.toml"), re.M).group(1)


# The oldest torch the op library serves: its stable-ABI target (csrc/stable.h), and the minimum
# mmfuse/_extension.py checks before loading it. Raising it drops the older torch releases.
TORCH_TARGET = (2, 11)
TORCH_TARGET_FLAG = f"-DTORCH_TARGET_VERSION=0x{TORCH_TARGET[0]:02x}{TORCH_TARGET[1]:02x}000000000000"


def _torch_release() -> str:
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def _version(cuda: bool) -> str:
    base = re.search(r'^__version__ = "([^"]+)"', _read("mmfuse/__init__.py"), re.M).group(1)
    flavour = f"cu{torch.version.cuda.replace('.', '')}" if cuda else "cpu"
    return f"{base}+{flavour}"


def _build_record(cuda: bool) -> dict:
    """What ``mmfuse._extension`` checks the running torch against before it loads the op library."""
    return {"torch": torch.__version__, "torch_release": _torch_release(),
            "torch_target": ".".join(map(str, TORCH_TARGET)),
            "cuda": torch.version.cuda if cuda else None,
            "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST", "") if cuda else "",
}


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


def _sanitizer_flags() -> list[str]:
    # MMFUSE_SANITIZE=address,undefined: the ASan/UBSan build of `make cpu-sanitize` (CPU kernels
    # only; load it with libasan preloaded into the interpreter, as tools/cpu_sanitize.sh does)
    wanted = os.environ.get("MMFUSE_SANITIZE", "")
    if not wanted:
        return []
    return ["-O1", "-g", f"-fsanitize={wanted}", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]


WANT_CUDA = _want_cuda() and not _sanitizer_flags()
KERNEL_SOURCES = sorted(glob.glob("csrc/cpu/*.cpp"))
if WANT_CUDA:
    KERNEL_SOURCES += sorted(glob.glob("csrc/cuda/*.cu"))
OPS_SOURCES = ["csrc/ops.cpp"] + KERNEL_SOURCES


def _extensions():
    sanitize = _sanitizer_flags()
    cxx = sanitize or ["-O3"]  # no -fopenmp: the stable parallel_for runs on torch's own thread pool
    link = [f for f in sanitize if f.startswith("-fsanitize")]
    if platform.machine() in ("x86_64", "AMD64"):
        # 256-bit vectors (csrc/cpu/vec.h) for the attention softmax and the fusion loops: every x86 CPU since 2013
        cxx += ["-mavx2", "-mfma", "-mf16c"]
    include = [os.path.join(HERE, "csrc")]  # "cuda/..._kernel.cuh", as tools/cuda_check.py has it
    archs = ""
    if WANT_CUDA:
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", wheel_cuda_archs())
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    cuda_macros = [("MMFUSE_WITH_CUDA", None)] if WANT_CUDA else []

    def kernels(name, sources, flags, **kw):
        cuda = any(f.endswith(".cu") for f in sources)
        if cuda:
            return CUDAExtension(name, sources, include_dirs=include, define_macros=cuda_macros,
                                 extra_compile_args={"cxx": cxx + flags, "nvcc": ["-O3", "-lineinfo"] + flags},
                                 extra_link_args=link, **kw)
        return CppExtension(name, sources, include_dirs=include, define_macros=cuda_macros,
                            extra_compile_args=cxx + flags, extra_link_args=link, **kw)

    # the op library: no Python symbol (py_limited_api drops libtorch_python from the link), torch only
    # through the stable C shims (TORCH_TARGET_VERSION hides everything else); USE_CUDA, as torch's own
    # CUDA build defines it, for the CUDA shims the launchers call (aoti_torch_get_current_cuda_stream)
    ops = kernels("mmfuse._ops", OPS_SOURCES, [TORCH_TARGET_FLAG] + (["-DUSE_CUDA"] if WANT_CUDA else []),
                  py_limited_api=True)
    info_macros = cuda_macros + [("MMFUSE_CUDA_ARCHS", f'"{archs}"'),
                                 ("MMFUSE_TORCH_HEADERS", f'"{torch.__version__.split("+")[0]}"'),
                                 ("MMFUSE_TORCH_TARGET", '"{}.{}"'.format(*TORCH_TARGET))]
    # _C: pybind11's headers (torch ships them) and nothing of torch
    info = Extension("mmfuse._C", ["csrc/build_info.cpp"], include_dirs=include_paths()[:1],
                     define_macros=info_macros, extra_compile_args=["-O2", "-std=c++17"], language="c++")
    return [ops, info]


EXTENSIONS = _extensions()
WITH_CUDA = WANT_CUDA
setup(
    version=_version(WITH_CUDA),
    ext_modules=EXTENSIONS,
    cmdclass={"build_ext": BuildExt},
)
