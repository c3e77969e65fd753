"""The build: kernel bodies compile for the GPU archs, the package degrades without _C, wheels install."""
import glob
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mmfuse

ROOT = Path(__file__).resolve().parents[1]
KERNEL_BODIES = sorted(glob.glob(str(ROOT / "csrc" / "cuda" / "*_kernel.cuh")))


def test_there_are_kernel_bodies_to_check():
    assert KERNEL_BODIES, "csrc/cuda/*_kernel.cuh not found"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
# each kernel body on its own, without torch, in C++17: the bodies are torch-free (the emulator and
# the launchers include the same file), and every instantiation compiles to PTX. The machine code,
# registers and spills of every architecture of the wheel list are make cuda-check's.
@pytest.mark.parametrize("body", KERNEL_BODIES, ids=lambda p: Path(p).name)
def test_nvcc_compiles_kernel_body(body, tmp_path):
    unit = tmp_path / "check.cu"
    unit.write_text(f'#include "{body}"\n')
    cmd = ["nvcc", "-std=c++17", "-DMMFUSE_KERNEL_COMPILE_CHECK", "-arch=compute_80", "-ptx", str(unit),
           "-o", str(tmp_path / "check.ptx")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert ".entry" in (tmp_path / "check.ptx").read_text()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_nvcc_compiles_emulator_primitives(tmp_path):
    # the kernels that test the host emulator also build for the GPU (test_emulator.py's cuda test),
    # and so does every wrapper of csrc/cuda/mma.cuh they instantiate
    source = ROOT / "tests" / "emulator" / "primitives.cu"
    cmd = ["nvcc", "-x", "cu", "-std=c++17", f"-I{ROOT / 'csrc'}", f"-I{source.parent}",
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
           "-Xptxas", "-warn-spills", "-c", str(source), "-o", str(tmp_path / "primitives.o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr and "spill" not in result.stderr, result.stderr


def test_build_info_describes_this_build():
    info = mmfuse.build_info()
    assert info["extension_loaded"], info["load_error"]
    # one build serves every torch from its stable-ABI target on, whichever compiled it
    assert info["torch_target"] == "2.11"
    built = tuple(int(p) for p in info["torch_built_against"].split("+")[0].split(".")[:2])
    assert (2, 11) <= built, info
    assert info["cuda"] == (torch.version.cuda is not None and "MMFUSE_SKIP_CUDA_BUILD" not in os.environ
                            and info["cuda"])  # a CPU torch can never report CUDA kernels
    if torch.version.cuda is None:
        assert info["cuda"] is False
    assert "cpu" in mmfuse.available_backends("cpu") and "reference" in mmfuse.available_backends("cpu")


def test_package_imports_and_falls_back_without_the_extension():
    script = textwrap.dedent(
        """
        import sys, warnings, torch
        def blocked(path):
            raise OSError("blocked for the test")
        torch.ops.load_library = blocked
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import mmfuse
        messages = [str(w.message) for w in caught if "op library" in str(w.message)]
        assert len(messages) == 1 and "blocked for the test" in messages[0], messages
        import torch
        assert "cpu" not in mmfuse.available_backends("cpu")
        out = mmfuse.pack_modalities([torch.ones(2, 3, 4)], [torch.tensor([3, 1])])
        assert out.tokens.shape == (4, 4)
        try:
            mmfuse.pack_modalities([torch.ones(2, 3, 4)], backend="cpu")
        except ValueError as e:
            assert "op library is not loaded" in str(e)
        else:
            raise AssertionError("backend='cpu' ran without _C")
        print("fallback-ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert "fallback-ok" in result.stdout, result.stderr


@pytest.mark.slow
def test_wheel_builds_installs_and_runs(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
        check=True, cwd=ROOT,
    )
    wheels = list(dist.glob("mmfuse-*.whl"))
    assert len(wheels) == 1, wheels
    # the local version names the kernels' flavour (CPU, or the CUDA version): not the torch release,
    # which the stable-ABI op library does not depend on
    flavour = f"cu{torch.version.cuda.replace('.', '')}" if mmfuse.build_info()["cuda"] else "cpu"
    assert f"+{flavour}-" in wheels[0].name, wheels[0].name
    python = _venv_seeing_this_torch(tmp_path / "venv")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheels[0])], check=True)
    smoke = textwrap.dedent(
        """
        import torch, mmfuse
        assert mmfuse.__file__.startswith(sys.prefix), mmfuse.__file__
        info = mmfuse.build_info()
        assert info["extension_loaded"], info
        x = [torch.randn(2, 5, 8), torch.randn(2, 3, 8)]
        lengths = [torch.tensor([5, 2]), torch.tensor([0, 3])]
        out = mmfuse.pack_modalities(x, lengths, backend="cpu")
        ref = torch.cat([x[0][0], x[0][1, :2], x[1][1]])
        assert torch.equal(out.tokens, ref)
        print("wheel-ok", mmfuse.__file__)
        """
    )
    result = subprocess.run([python, "-c", "import sys\n" + smoke], capture_output=True, text=True, cwd=tmp_path)
    assert "wheel-ok" in result.stdout, result.stderr
    # a torch older than the build's target (simulated: the record's target raised above this
    # torch): one clear warning naming the minimum, the reference backend still there, no
    # undefined-symbol traceback
    record = Path(subprocess.run([python, "-c", "import mmfuse._extension as e; print(e.BUILD_RECORD)"],
                                 capture_output=True, text=True, cwd=tmp_path, check=True).stdout.strip())
    data = json.loads(record.read_text())
    data.update(torch_target="2.99")
    record.write_text(json.dumps(data))
    other = textwrap.dedent(
        """
        import warnings, torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import mmfuse
        assert not mmfuse.build_info()["extension_loaded"]
        print([str(w.message) for w in caught])
        out = mmfuse.pack_modalities([torch.randn(2, 3, 4)], [torch.tensor([3, 1])], backend="reference")
        print("other-torch-ok", out.tokens.shape[0])
        """
    )
    result = subprocess.run([python, "-c", other], capture_output=True, text=True, cwd=tmp_path)
    assert "other-torch-ok 4" in result.stdout, result.stderr
    assert "need torch >= 2.99" in result.stdout and f"this is torch {torch.__version__}" in result.stdout
    assert "undefined symbol" not in result.stdout + result.stderr


CPU_213 = {"torch": "2.13.0+cpu", "torch_release": "2.13", "torch_target": "2.11", "cuda": None}
CU_213 = {"torch": "2.13.0+cu130", "torch_release": "2.13", "torch_target": "2.11", "cuda": "13.0"}


@pytest.mark.parametrize("record, torch_version, torch_cuda, expected", [
    # the stable-ABI op library: any torch from the target on, older or newer than the one that built it
    (CPU_213, "2.13.1", None, None),
    (CPU_213, "2.11.0", None, None),
    (CPU_213, "2.14.1+cu130", "13.0", None),
    (CPU_213, "3.0.0", None, None),
    (CPU_213, "2.10.0", None, "need torch >= 2.11"),
    (CPU_213, "2.9.1+cu128", "12.8", "need torch >= 2.11"),
    (CU_213, "2.11.0+cu130", "13.0", None),
    (CU_213, "2.15.0+cu132", "13.2", None),
    (CU_213, "2.13.0+cpu", None, "it is a CUDA build and this torch has no CUDA"),
    (CU_213, "2.12.0+cu128", "12.8", "it was built for CUDA 13.0"),
    # a record without a target (an older mmfuse build): its own torch release only
    ({"torch": "2.11.0+cpu", "torch_release": "2.11", "cuda": None}, "2.12.0", None, "it was built for torch 2.11"),
])
def test_build_record_mismatch(record, torch_version, torch_cuda, expected):
    from mmfuse._extension import build_mismatch

    message = build_mismatch(record, torch_version, torch_cuda)
    if expected is None:
        assert message is None
    else:
        assert expected in message and f"this is torch {torch_version}" in message


def _venv_seeing_this_torch(venv: Path) -> Path:
    """A fresh venv whose ``sys.path`` ends with the site-packages that hold the running
    interpreter's torch, so it reuses that torch (a new one is a multi-GB download) whether the
    tests run in a venv or not. ``--system-site-packages`` would reach the *base* interpreter,
    which has no torch when the tests run in a venv. A ``.pth`` adds the directory only: its own
    ``.pth`` files (this checkout's editable install) are not processed, so the wheel installed
    into the venv is the mmfuse it imports."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_dir = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    torch_site = str(Path(torch.__file__).resolve().parents[1])
    Path(site_dir, "_mmfuse_test_torch.pth").write_text(torch_site + "\n")
    return python


def test_pip_install_with_build_isolation_explains_what_to_run(tmp_path):
    """``pip install .`` (isolated build, where torch is absent) stops with our message, not a traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "torch is not importable in this build environment" in output, output[-3000:]
    assert "pip install --no-build-isolation ." in output
    assert "Traceback" not in output, output[-3000:]
    assert not list(tmp_path.glob("*.whl"))


def test_cuda_check_reads_the_wheel_architectures():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import cuda_check
    finally:
        sys.path.pop(0)
    assert cuda_check.wheel_archs() == ("sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120")
    assert cuda_check.HOST_ARCH in cuda_check.wheel_archs()
    # known spills only where ptxas was seen to make them, never on the architectures we tune for
    assert {arch for _, arch in cuda_check.KNOWN_SPILLS} <= {"sm_100a", "sm_120"}
    assert all(0 < limit <= 64 for limit in cuda_check.KNOWN_SPILLS.values())
    command = cuda_check.nvcc_command("nvcc", ROOT / "csrc" / "cuda" / "fusion.cu", ROOT, ("sm_90a",))
    assert "-gencode=arch=compute_90a,code=sm_90a" in command and "-c" in command
    kernels = cuda_check.nvcc_command("nvcc", ROOT / "csrc" / "cuda" / "fusion.cu", ROOT, ("sm_120",), device_only=True)
    assert "-gencode=arch=compute_120,code=sm_120" in kernels and "-cubin" in kernels and "-c" not in kernels
    # the launchers build into the stable-ABI op library: setup.py's target version, torch's USE_CUDA, nothing of _C
    assert cuda_check.torch_target_flag() in command and "-DUSE_CUDA" in command
    assert not any(flag.startswith("-DTORCH_EXTENSION_NAME") for flag in command)
