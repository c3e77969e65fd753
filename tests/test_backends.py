"""Backend selection (DESIGN.md, "Backends"): ``auto`` takes a CUDA kernel only for an op on the
verified list, a named backend that cannot run the case raises with the reason."""
import pytest
import torch

from mmfuse import backends

CUDA = torch.device("cuda")
ALL = ("cuda", "triton", "cpu", "reference")


@pytest.fixture
def everything_available(monkeypatch):
    """Pretend this build has every backend on every device, so only the selection rule decides."""
    monkeypatch.setattr(backends, "_unavailable", lambda backend, device: None)
    monkeypatch.delenv("MMFUSE_BACKEND", raising=False)


def test_auto_skips_a_cuda_kernel_that_is_not_verified(everything_available, monkeypatch):
    monkeypatch.setattr(backends, "VERIFIED_CUDA_OPS", frozenset())
    assert backends.choose_backend("pack_modalities", "auto", CUDA, ALL) == "triton"


def test_auto_takes_a_verified_cuda_kernel(everything_available, monkeypatch):
    monkeypatch.setattr(backends, "VERIFIED_CUDA_OPS", frozenset({"pack_modalities"}))
    assert backends.choose_backend("pack_modalities", "auto", CUDA, ALL) == "cuda"
    assert backends.choose_backend("cross_attention", "auto", CUDA, ALL) == "triton"


def test_auto_skips_a_verified_cuda_kernel_that_cannot_take_the_case(everything_available, monkeypatch):
    monkeypatch.setattr(backends, "VERIFIED_CUDA_OPS", frozenset({"cross_attention"}))
    reason = {"cuda": "head dim 40 is not 64 or 128"}.get
    assert backends.choose_backend("cross_attention", "auto", CUDA, ALL, reason) == "triton"


def test_named_cuda_backend_runs_without_verification(everything_available, monkeypatch):
    monkeypatch.setattr(backends, "VERIFIED_CUDA_OPS", frozenset())
    assert backends.choose_backend("pack_modalities", "cuda", CUDA, ALL) == "cuda"


def test_named_backend_that_cannot_take_the_case_says_why(everything_available):
    reason = {"cuda": "head dim 40 is not 64 or 128"}.get
    with pytest.raises(ValueError, match="backend 'cuda' cannot run this case: head dim 40"):
        backends.choose_backend("cross_attention", "cuda", CUDA, ALL, reason)


def test_the_verified_list_names_only_ops_with_committed_gpu_evidence():
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    for op in backends.VERIFIED_CUDA_OPS:
        assert list(results.glob(f"*-{op}*.json")), f"{op} is on the verified list without a GPU result in {results}"


def test_cuda_backend_without_a_gpu_says_why():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert backends._unavailable("cuda", torch.device("cpu")) == "the 'cuda' backend takes CUDA tensors, got cpu tensors"
