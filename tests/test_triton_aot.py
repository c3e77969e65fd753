"""The ahead-of-time Triton check (``make triton-check``): it rejects what cannot run on the GPU,
and its case tables cover every kernel. Runs without a GPU, outside the interpreter."""
import importlib
import re

import pytest
import torch

from mmfuse.backends import triton_interpreted

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

pytestmark = pytest.mark.skipif(triton_interpreted(), reason="the GPU compiler's check runs without TRITON_INTERPRET")

from mmfuse.triton import aot_check  # noqa: E402
from mmfuse.triton._aot import jit_function, kernel_case  # noqa: E402


@triton.jit
def _tiny_dot_kernel(X, Out, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tile = offs[:, None] * BLOCK + offs[None, :]
    x = tl.load(X + tile)
    tl.store(Out + tile, tl.dot(x, x))


@triton.jit
def _gemm_kernel(A, B, C, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # C (BLOCK_M, BLOCK_N) = A (BLOCK_M, K) @ B (K, BLOCK_N), all contiguous
    m, n, k = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(A + m[:, None] * K + (k0 + k)[None, :])
        b = tl.load(B + (k0 + k)[:, None] * BLOCK_N + n[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(C + m[:, None] * BLOCK_N + n[None, :], acc)


def test_a_kernel_the_gpu_compiler_rejects_fails_the_check():
    # tl.dot needs tiles of at least 16 in every dimension
    case = kernel_case(_tiny_dot_kernel, "float16", dict(X=torch.float16, Out=torch.float32), dict(BLOCK=8))
    result = aot_check.compile_case(case, 80)
    assert result.error is not None
    assert result.problems() and "does not compile" in result.problems()[0]


def test_a_config_over_the_shared_memory_limit_fails_the_check():
    # a deep pipeline of 128x128 fp16 tiles: 192 KiB of shared memory (measured), over sm_80's
    # 163 KiB, within sm_90's 227 KiB
    config = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=6)
    case = kernel_case(_gemm_kernel, "float16", dict(A=torch.float16, B=torch.float16, C=torch.float32), {},
                       config=config)
    on_ampere, on_hopper = aot_check.compile_case(case, 80), aot_check.compile_case(case, 90)
    assert on_ampere.error is None and on_ampere.shared > aot_check.SHARED_LIMIT[80]
    assert any("shared memory" in p for p in on_ampere.problems())
    assert not any("shared memory" in p for p in on_hopper.problems())


def test_a_spill_is_reported_not_failed():
    case = kernel_case(_gemm_kernel, "float16", dict(A=torch.float16, B=torch.float16, C=torch.float32), {})
    spilled = aot_check.Compiled(case, 80, shared=1024, registers=255, spill_bytes=64)
    assert spilled.problems() == [] and spilled.warnings() == ["spills 64 bytes to local memory"]


def test_the_attention_forward_uses_warp_group_mma_on_hopper():
    from mmfuse.triton import cross_attention

    case = next(c for c in cross_attention.aot_cases() if c.name == "_forward_kernel" and c.label == "float16")
    hopper, ampere = aot_check.compile_case(case, 90), aot_check.compile_case(case, 80)
    assert hopper.problems() == [] and ampere.problems() == []
    assert hopper.wgmma and not ampere.wgmma
    assert 0 < hopper.registers <= 255


@pytest.mark.parametrize("module_name", aot_check.KERNEL_MODULES)
def test_every_kernel_has_cases(module_name):
    """Every ``triton.jit`` function in the module that no other one calls is a kernel a launcher
    launches, and must appear in the module's ``aot_cases()``."""
    module = importlib.import_module(f"mmfuse.triton.{module_name}")
    jits = {jit_function(v).__name__: jit_function(v) for v in vars(module).values() if _is_jit(v)}
    called = {name for name in jits for other in jits.values()
              if other.__name__ != name and re.search(rf"\b{name}\(", other.src)}
    kernels = set(jits) - called
    assert kernels
    covered = {case.name for case in module.aot_cases()}
    assert kernels <= covered, f"kernels without ahead-of-time cases: {sorted(kernels - covered)}"


def test_the_kernel_modules_are_every_triton_module():
    import pkgutil

    import mmfuse.triton

    with_kernels = {m.name for m in pkgutil.iter_modules(mmfuse.triton.__path__)
                    if any(_is_jit(v) for v in vars(importlib.import_module(f"mmfuse.triton.{m.name}")).values())}
    assert with_kernels == set(aot_check.KERNEL_MODULES)


@pytest.mark.parametrize("extra", [False, True], ids=["masks", "masks+attn_mask+dropout"])
def test_autotuned_kernels_check_every_config_the_autotuner_keeps(extra):
    from mmfuse.triton import cross_attention

    meta = dict(HEAD_DIM=64, BLOCK_D=64, HAS_MASK=True, CAUSAL=True, PRECISION="ieee", UPCAST=False,
                HAS_BIAS=extra, DROPOUT=extra)
    pointers = cross_attention._attention_pointers(torch.float16, True, extra)[cross_attention._forward_kernel]
    kept = {(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
            for c in aot_tuned(cross_attention._forward_kernel, pointers, meta)}
    checked = {(tuple(sorted((k, v) for k, v in c.constexprs.items() if k in ("BLOCK_M", "BLOCK_N"))), c.num_warps,
                c.num_stages) for c in cross_attention.aot_cases()
               if c.name == "_forward_kernel" and c.label == "float16" and c.constexprs["BLOCK_D"] == 64
               and c.constexprs["HAS_MASK"] and c.constexprs["CAUSAL"] and c.constexprs["DROPOUT"] == extra}
    assert kept and kept == checked


def aot_tuned(kernel, pointers, meta):
    from mmfuse.triton._aot import tuned_configs

    return tuned_configs(kernel, pointers, meta)


def _is_jit(value) -> bool:
    """A ``triton.jit`` function, or an autotuner/heuristics wrapper of one."""
    return isinstance(value, triton.runtime.KernelInterface)
