"""The op library is on the LibTorch stable ABI: no C++ or Python symbol of torch, only the C shims."""
import glob
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmfuse
from mmfuse import _extension

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import check_abi  # noqa: E402


def test_op_library_is_loaded_and_holds_every_op():
    library = _extension.ops_library_path()
    assert library is not None and library.name.startswith("_ops") and ".abi3." in library.name, library
    assert mmfuse.build_info()["ops_library"] == str(library)
    assert mmfuse.build_info()["torch_target"] == "2.11"
    for op in ("pack_modalities", "unpack_modalities", "fused_concat_linear", "fused_concat_linear_bwd",
               "combine_modalities", "combine_modalities_bwd", "cross_attention_fwd", "cross_attention_bwd",
               "cross_attention_varlen_fwd", "cross_attention_varlen_bwd", "mel_spectrogram",
               "mel_spectrogram_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mmfuse::{op}", "CPU"), op


def test_op_library_has_no_torch_cpp_symbol():
    bad, shims = check_abi.check(_extension.ops_library_path())
    assert bad == [], bad
    assert "torch_call_dispatcher" in shims, shims


def test_the_check_fails_on_a_library_that_uses_torch_cpp_symbols():
    # libtorch_python.so calls into libtorch_cpu through C++ symbols: the check must see them
    lib = glob.glob(str(Path(torch.__file__).parent / "lib" / "libtorch_python.so"))
    if not lib:
        pytest.skip("this torch has no libtorch_python.so")
    bad, _ = check_abi.check(Path(lib[0]))
    assert any("at::" in s or "c10::" in s for s in bad), bad[:5]


def test_check_abi_command_line():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "check_abi.py")], capture_output=True, text=True)
    assert result.returncode == 0 and "0 forbidden symbols" in result.stdout, result.stdout + result.stderr


def test_build_info_module_links_no_torch():
    # _C is pybind11 only: it needs no torch library at all
    import mmfuse._C as info_module

    out = subprocess.run(["nm", "-D", "--undefined-only", "-C", info_module.__file__], capture_output=True,
                         text=True, check=True).stdout
    assert "at::" not in out and "c10::" not in out and "torch::" not in out
