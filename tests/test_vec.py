"""csrc/cpu/vec.h, the CPU kernels' SIMD layer: its float exp, erf and tanh against libm (a sweep
and the special values), compiled as setup.py compiles the kernels (-O3, -mavx2 -mfma on x86) and
without vector flags (the generic lanes)."""
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "cpp" / "vec_accuracy.cpp"
FLAGS = [["-O3", "-mavx2", "-mfma"], ["-O3"]] if platform.machine() in ("x86_64", "AMD64") else [["-O3"]]


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: " ".join(f))
def test_vec_functions_are_accurate(flags, tmp_path):
    exe = tmp_path / "vec_accuracy"
    subprocess.run(["g++", "-std=c++17", *flags, f"-I{ROOT / 'csrc'}", str(SOURCE), "-o", str(exe)], check=True,
                   capture_output=True)
    result = subprocess.run([str(exe)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "special 1" in result.stdout, result.stdout
