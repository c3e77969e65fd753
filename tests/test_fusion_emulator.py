"""The CUDA fusion kernels (csrc/cuda/fusion_kernel.cuh) on the host emulator.

combine_modalities forward and backward, launched as csrc/cuda/fusion.cu launches them (same
launch-config helpers, same two-step deterministic grad_weights reduction), against
mmfuse.reference.fusion at DESIGN.md's tolerance: every mode and activation, every dtype,
M = 1..4, odd numel (3 x 37, 1 x 1, 0 elements), a grid-stride case (one block for more than
256 steps), and misaligned inputs (a view one element past a 16-byte boundary) that take the
scalar kernel. The fused_concat_linear epilogue and activation-gradient kernels against
PyTorch, and composed with PyTorch's matmuls as the launcher composes them with cuBLAS.
Outputs start as NaN, so an element the kernel never writes fails the comparison.
"""
import pytest
import torch

from backend_params import HAS_CUDA
from emulator_build import HARNESS_DIR, load_gpu_harness, load_harness
from mmfuse.reference import fusion as reference
from test_fusion import within_torch_error

pytestmark = pytest.mark.emulator

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ACTIVATIONS = [None, "relu", "gelu", "silu", "tanh", "sigmoid"]
MODES = ["sum", "product", "gated"]
ACT_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}  # mmfuse::cuda::Act
MODE_CODES = {name: code for code, name in enumerate(MODES)}      # mmfuse::cuda::CombineMode
MANY_BLOCKS = 1 << 20

# (shape, M, misaligned, max_blocks): odd numel with a vector tail, 1 element, a multiple of
# every vector width, the scalar fallback, one block striding over more than 256 steps
COMBINE_CASES = [((3, 37), 3, False, MANY_BLOCKS), ((1, 1), 1, False, MANY_BLOCKS), ((5, 8), 4, False, MANY_BLOCKS),
                 ((3, 37), 2, True, MANY_BLOCKS), ((9, 131), 2, False, 1)]


def entry(name, like):
    """The harness entry for ``like``'s dtype: the emulator's for CPU tensors, nvcc's for CUDA ones."""
    load = load_gpu_harness if like.is_cuda else load_harness
    return getattr(load("fusion", HARNESS_DIR / "fusion.cpp"), f"{name}_{str(like.dtype).removeprefix('torch.')}")


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def placed(tensor, misaligned):
    """``tensor``, or a contiguous copy one element past a 16-byte boundary (the scalar path)."""
    if not misaligned:
        return tensor
    storage = torch.empty(tensor.numel() + 1, dtype=tensor.dtype)
    return storage[1:].view(tensor.shape).copy_(tensor)


def poisoned(like, misaligned=False):
    return placed(torch.full_like(like, float("nan")), misaligned)


def pointers(tensors, num):
    return torch.tensor([t.data_ptr() for t in tensors] + [0] * (num - len(tensors)), dtype=torch.int64)


def combine_case(shape, num, mode, dtype, misaligned):
    ps = [placed(torch.randn(shape).to(dtype), misaligned and m == num - 1) for m in range(num)]
    gates = [placed(torch.randn(shape).to(dtype), misaligned) for _ in range(num)] if mode == "gated" else []
    weights = reference.modality_weights(torch.randn(num), dtype) if mode == "sum" else None
    return ps, gates, weights


def combine_from_weights(ps, mode, weights, gates, activation):
    """reference.combine_modalities with the softmax-normalised weights as the "sum" input."""
    if mode == "sum":
        return reference.activate(sum(w * p for w, p in zip(weights, ps)), activation)
    return reference.combine_modalities(ps, mode, None, gates, activation)


def run_combine_forward(ps, mode, weights, gates, activation, max_blocks, misaligned=False):
    dtype, num = ps[0].dtype, len(ps)
    out = poisoned(ps[0], misaligned)
    info = torch.zeros(2, dtype=torch.int64)
    w = weights.to(acc_dtype(dtype)) if weights is not None else None
    entry("combine", ps[0])(0, MODE_CODES[mode], ACT_CODES[activation], pointers(ps, num), pointers(gates, num), w,
                            out, None, pointers([], num), pointers([], num), None, None, ps[0].numel(),
                            num, max_blocks, info)
    return out, info


def run_combine_backward(grad, ps, mode, weights, gates, activation, max_blocks, misaligned=False):
    dtype, num = ps[0].dtype, len(ps)
    grad_ps = [poisoned(p, misaligned) for p in ps]
    grad_gates = [poisoned(g) for g in gates]
    grad_weights = torch.full((num,), float("nan"), dtype=torch.float64, device=grad.device)
    partials = torch.empty((ps[0].numel() // 256 + 1) * num, dtype=torch.float64, device=grad.device)  # >= grid.x * M
    info = torch.zeros(2, dtype=torch.int64)
    w = weights.to(acc_dtype(dtype)) if weights is not None else None
    entry("combine", ps[0])(1, MODE_CODES[mode], ACT_CODES[activation], pointers(ps, num), pointers(gates, num), w,
                            None, grad, pointers(grad_ps, num), pointers(grad_gates, num), partials,
                            grad_weights, ps[0].numel(), num, max_blocks, info)
    return grad_ps, grad_weights, grad_gates, info


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_combine_forward_and_backward_match_reference(dtype, mode, activation):
    for shape, num, misaligned, max_blocks in COMBINE_CASES:
        ps, gates, weights = combine_case(shape, num, mode, dtype, misaligned)
        out, info = run_combine_forward(ps, mode, weights, gates, activation, max_blocks, misaligned)
        assert info[0].item() == (not misaligned)  # the 16-byte path unless a pointer is misaligned

        leaves = [*ps, *gates] + ([weights] if mode == "sum" else [])

        def run(tensors):
            tensors = [t.detach().clone().requires_grad_() for t in tensors]
            p, g = tensors[:num], tensors[num : num + len(gates)]
            w = tensors[-1] if mode == "sum" else None
            y = combine_from_weights(p, mode, w, g, activation)
            return y, torch.autograd.grad(y, tensors, grad.to(y.dtype))

        grad = torch.randn(shape).to(dtype)
        y_torch, grads_torch = run(leaves)
        y64, grads64 = run([t.double() for t in leaves])
        within_torch_error(out, y64, y_torch, dtype)

        # the backward recomputes the pre-activation from the inputs (none is saved)
        grad_ps, grad_weights, grad_gates, info = run_combine_backward(
            grad, ps, mode, weights, gates, activation, max_blocks, misaligned
        )
        assert info[0].item() == (not misaligned)
        got = [*grad_ps, *grad_gates] + ([grad_weights.to(dtype)] if mode == "sum" else [])
        for g, g64, gt in zip(got, grads64, grads_torch):
            within_torch_error(g, g64, gt, dtype)


def test_product_gradient_exact_with_a_zero_factor():
    ps = [torch.tensor([[0.0, 2.0]]), torch.tensor([[3.0, 0.0]])]
    grad_ps, _, _, _ = run_combine_backward(torch.ones(1, 2), ps, "product", None, [], None, MANY_BLOCKS)
    assert grad_ps[0].tolist() == [[3.0, 0.0]] and grad_ps[1].tolist() == [[0.0, 2.0]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sum_grad_weights_is_deterministic_and_independent_of_the_grid(dtype):
    ps, _, weights = combine_case((7, 97), 3, "sum", dtype, misaligned=False)
    grad = torch.randn(7, 97).to(dtype)
    runs = [run_combine_backward(grad, ps, "sum", weights, [], None, blocks)[1] for blocks in (1, 3, 3)]
    assert torch.equal(runs[1], runs[2])
    want = torch.stack([(grad.double() * p.double()).sum() for p in ps])
    for got in runs[:2]:
        torch.testing.assert_close(got, want, rtol=1e-6 if dtype != torch.float64 else 1e-13, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_combine_with_no_elements_launches_nothing(mode):
    ps = [torch.empty(0, 5) for _ in range(2)]
    gates = [torch.empty(0, 5) for _ in range(2)] if mode == "gated" else []
    weights = torch.tensor([0.25, 0.75]) if mode == "sum" else None
    out, _ = run_combine_forward(ps, mode, weights, gates, "gelu", MANY_BLOCKS)
    assert out.shape == (0, 5)
    _, grad_weights, _, _ = run_combine_backward(torch.empty(0, 5), ps, mode, weights, gates, "gelu", MANY_BLOCKS)
    assert grad_weights.isnan().all()  # untouched: the launcher returns zeros without launching


# ---- fused_concat_linear: the epilogue and the activation-gradient kernels ----------------------

LINEAR_SHAPES = [(29, 7, 1 << 20), (1, 1, 1 << 20), (37, 45, 2)]  # (rows, cols, max_row_blocks)


def assert_within_ulps(got, want):
    """Equal up to about an ulp of the dtype: exp/erf/tanh differ in the last bit between libraries."""
    eps = torch.finfo(got.dtype).eps
    torch.testing.assert_close(got, want, rtol=max(2 * eps, 1.3e-6), atol=1e-5)


def run_epilogue(acc, bias, activation, dtype, max_row_blocks):
    out = torch.full(acc.shape, float("nan"), dtype=dtype, device=acc.device)
    preact = None if activation is None else torch.full_like(out, float("nan"))
    info = torch.zeros(2, dtype=torch.int64)
    entry("linear_epilogue", out)(acc, bias, preact, out, acc.shape[0], acc.shape[1], ACT_CODES[activation],
                                    max_row_blocks, info)
    return out, preact, info


def run_grad(grad_out, preact, activation, has_bias, max_row_blocks):
    dtype = grad_out.dtype
    grad = None if activation is None else torch.full_like(grad_out, float("nan"))
    rows, cols = grad_out.shape
    grad_bias = torch.full((cols,), float("nan"), dtype=dtype, device=grad_out.device) if has_bias else None
    partials = torch.empty(((rows + 7) // 8) * cols, dtype=acc_dtype(dtype), device=grad_out.device)  # >= grid.y * cols
    info = torch.zeros(2, dtype=torch.int64)
    entry("linear_grad", grad_out)(grad_out, preact, grad, grad_bias, partials, rows, cols, ACT_CODES[activation],
                                max_row_blocks, info)
    return (grad_out if grad is None else grad), grad_bias, info


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_epilogue_and_activation_grad_match_pytorch(dtype, activation):
    for rows, cols, max_row_blocks in LINEAR_SHAPES:
        for has_bias in (False, True):
            acc = torch.randn(rows, cols, dtype=acc_dtype(dtype))
            bias = torch.randn(cols).to(dtype) if has_bias else None
            out, preact, info = run_epilogue(acc, bias, activation, dtype, max_row_blocks)
            assert info[1].item() == min((rows + 7) // 8, max_row_blocks)
            want_preact = (acc + bias.to(acc.dtype) if has_bias else acc).to(dtype)  # rounded once
            if activation is not None:
                assert torch.equal(preact, want_preact)
            assert_within_ulps(out, reference.activate(want_preact, activation))

            z = want_preact.clone().requires_grad_()
            grad_out = torch.randn(rows, cols).to(dtype)
            torch.autograd.backward(reference.activate(z, activation), grad_out)
            g, grad_bias, _ = run_grad(grad_out, preact, activation, has_bias, max_row_blocks)
            assert_within_ulps(g, z.grad)
            if has_bias:
                # column sums of the kernel's own g (PyTorch's g may differ from it by an ulp)
                torch.testing.assert_close(grad_bias, g.to(acc.dtype).sum(0).to(dtype))


@pytest.mark.parametrize("activation", [None, "gelu", "sigmoid"], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_concat_linear_composed_as_the_launcher_matches_reference(dtype, activation):
    """PyTorch's matmuls in the launcher's precision around the emulated kernels, vs cat + linear."""
    n, dims, out_features = 29, (1, 3, 37), 7
    acc_t = acc_dtype(dtype)
    xs = [torch.randn(n, d).to(dtype) for d in dims]
    weight = (torch.randn(out_features, sum(dims)) / 3).to(dtype)
    bias = torch.randn(out_features).to(dtype)
    grad_out = torch.randn(n, out_features).to(dtype)
    blocks = list(torch.split(weight, dims, dim=1))  # W_i: column views, no copy

    # forward: acc = sum_i x_i @ W_i^T accumulated in fp32 (fp64), then the epilogue kernel
    acc = sum(x.to(acc_t) @ w.to(acc_t).T for x, w in zip(xs, blocks))
    out, preact, _ = run_epilogue(acc, bias, activation, dtype, 1 << 20)
    # backward: the activation-grad + bias kernel, then grad_x_i = g @ W_i, grad_W_i = g^T @ x_i
    g, grad_bias, _ = run_grad(grad_out, preact, activation, True, 1 << 20)
    grad_xs = [(g.to(acc_t) @ w.to(acc_t)).to(dtype) for w in blocks]
    grad_weight = torch.cat([(g.to(acc_t).T @ x.to(acc_t)).to(dtype) for x in xs], dim=1)

    def run(tensors):
        tensors = [t.detach().clone().requires_grad_() for t in tensors]
        y = reference.fused_concat_linear(tensors[:3], tensors[3], tensors[4], activation)
        return y, torch.autograd.grad(y, tensors, grad_out.to(y.dtype))

    leaves = [*xs, weight, bias]
    y_torch, grads_torch = run(leaves)
    y64, grads64 = run([t.double() for t in leaves])
    within_torch_error(out, y64, y_torch, dtype)
    for got, g64, gt in zip([*grad_xs, grad_weight, grad_bias], grads64, grads_torch):
        within_torch_error(got, g64, gt, dtype)



@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_runs_the_harness_as_the_emulator_does(dtype):
    """The same harness built by nvcc on the GPU: the first GPU run also checks the emulator."""
    def on(device, tensors):
        return [t.to(device) for t in tensors]

    for mode in MODES:
        ps, gates, weights = combine_case((9, 131), 3, mode, dtype, misaligned=False)
        grad = torch.randn(9, 131).to(dtype)
        results = {}
        for device in ("cpu", "cuda"):
            w = weights.to(device) if weights is not None else None
            out, info = run_combine_forward(on(device, ps), mode, w, on(device, gates), "gelu", 4)
            grad_ps, grad_w, grad_gates, _ = run_combine_backward(grad.to(device), on(device, ps), mode, w,
                                                                  on(device, gates), preact, "gelu", 4)
            results[device] = [out, preact, *grad_ps, *grad_gates] + ([grad_w] if mode == "sum" else [])
            assert info.tolist() == [1, 4]
        for emulated, gpu in zip(results["cpu"], results["cuda"]):
            assert_within_ulps(gpu.cpu(), emulated)

    results = {}
    for device in ("cpu", "cuda"):
        acc = torch.randn(37, 45, dtype=acc_dtype(dtype), generator=torch.Generator().manual_seed(1)).to(device)
        bias = torch.randn(45, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
        grad_out = torch.randn(37, 45, generator=torch.Generator().manual_seed(3)).to(dtype).to(device)
        out, preact, _ = run_epilogue(acc, bias, "silu", dtype, 2)
        g, grad_bias, _ = run_grad(grad_out, preact, "silu", True, 2)
        results[device] = [out, preact, g, grad_bias]
    for emulated, gpu in zip(results["cpu"], results["cuda"]):
        assert_within_ulps(gpu.cpu(), emulated)
