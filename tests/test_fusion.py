"""fused_concat_linear, combine_modalities and FeatureFusion against independent formulas."""
import pytest
import torch
import torch.nn.functional as F

import mmfuse
from backend_params import HAS_CUDA, backend_params, device_for

BACKENDS = backend_params("cpu", "triton", "cuda")

ACTS = {None: lambda x: x, "relu": torch.relu, "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / 2**0.5)),
        "silu": lambda x: x * torch.sigmoid(x), "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def blockwise_linear64(xs, weight, bias):
    """Σ_i x_i @ W_i.T + b in float64, one weight block per modality (no concatenation)."""
    out, start = 0, 0
    for x in xs:
        w = weight[:, start : start + x.shape[-1]].double()
        out = out + x.double() @ w.T
        start += x.shape[-1]
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("dims", [(1, 3, 257), (40,), (7, 7)])
def test_fused_concat_linear_matches_blockwise_float64(activation, dims):
    n, out = 31, 19
    xs = [torch.randn(n, d) for d in dims]
    weight = torch.randn(out, sum(dims)) / sum(dims) ** 0.5
    bias = torch.randn(out)
    got = mmfuse.fused_concat_linear(xs, weight, bias, activation)
    want = ACTS[activation](blockwise_linear64(xs, weight, bias))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_fused_concat_linear_keeps_leading_dims_and_no_bias():
    xs = [torch.randn(2, 5, 3), torch.randn(2, 5, 4)]
    weight = torch.randn(6, 7)
    got = mmfuse.fused_concat_linear(xs, weight)
    assert got.shape == (2, 5, 6)
    torch.testing.assert_close(got.double(), blockwise_linear64(xs, weight, None), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "sigmoid"])
def test_fused_concat_linear_gradcheck(activation):
    xs = [torch.randn(5, d, dtype=torch.float64, requires_grad=True) for d in (1, 3)]
    weight = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, w, c: mmfuse.fused_concat_linear([a, b], w, c, activation), (*xs, weight, bias)
    )


def within_torch_error(got, want64, torch_result, dtype):
    """DESIGN.md's rule: error vs float64 at most 2x PyTorch's own, plus a few roundings in ``dtype``.

    ``dtype`` is the computation's dtype (the fp32 logits' gradient passes through half
    weights). float64 results, where PyTorch's own error against float64 is zero, must agree
    to 1e-12 (a different accumulation order).
    """
    if dtype == torch.float64:
        torch.testing.assert_close(got, want64, rtol=1e-12, atol=1e-12)
        return
    err = (got.double() - want64).abs().max().item()
    torch_err = (torch_result.double() - want64).abs().max().item()
    eps = 8 * torch.finfo(dtype).eps * max(want64.abs().max().item(), 1.0)
    assert err <= 2 * torch_err + eps, (err, torch_err, eps, got.dtype, tuple(got.shape))


def kernel_dtypes(backend):
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    return dtypes + ([torch.float64] if backend in ("cpu", "cuda") else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", [None, "relu", "gelu", "silu", "tanh", "sigmoid"])
def test_fused_concat_linear_kernels_forward_and_backward(backend, activation):
    device = device_for(backend)
    for dtype in kernel_dtypes(backend):
        n, dims, out = 29, (1, 3, 257), 7
        xs = [torch.randn(n, d, device=device, dtype=dtype, requires_grad=True) for d in dims]
        weight = (torch.randn(out, sum(dims), device=device) / 3).to(dtype).requires_grad_()
        bias = torch.randn(out, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(n, out, device=device, dtype=dtype)
        leaves = [*xs, weight, bias]

        def run(fn, tensors):
            y = fn(tensors)
            return y, torch.autograd.grad(y, tensors, grad.to(y.dtype))

        fused = lambda t: mmfuse.fused_concat_linear(t[:3], t[3], t[4], activation, backend=backend)
        plain = lambda t: ACTS[activation](F.linear(torch.cat(t[:3], -1), t[3], t[4]))
        y, grads = run(fused, leaves)
        y_torch, grads_torch = run(plain, leaves)
        y64, grads64 = run(plain, [t.detach().double().requires_grad_() for t in leaves])
        assert y.dtype == dtype and y.shape == (n, out)
        within_torch_error(y, y64, y_torch, dtype)
        for g, g64, gt in zip(grads, grads64, grads_torch):
            assert g.dtype == dtype
            within_torch_error(g, g64, gt, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sum", "product", "gated"])
def test_combine_kernels_forward_and_backward(backend, mode):
    device = device_for(backend)
    for dtype in kernel_dtypes(backend):
        shape = (13, 3, 17)
        ps = [torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
        logits = torch.randn(3, device=device, dtype=torch.promote_types(dtype, torch.float32), requires_grad=True)
        gates = [torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
        kwargs = {"sum": {"logits": logits}, "gated": {"gate_logits": gates}, "product": {}}[mode]
        leaves = ps + {"sum": [logits], "gated": gates, "product": []}[mode]
        grad = torch.randn(shape, device=device, dtype=dtype)

        def run(b, tensors):
            k = dict(kwargs)
            if mode == "sum":
                k["logits"] = tensors[3]
            if mode == "gated":
                k["gate_logits"] = tensors[3:]
            y = mmfuse.combine_modalities(tensors[:3], mode, activation="gelu", backend=b, **k)
            return y, torch.autograd.grad(y, tensors, grad.to(y.dtype))

        y, grads = run(backend, leaves)
        y_torch, grads_torch = run("reference", leaves)
        y64, grads64 = run("reference", [t.detach().double().requires_grad_() for t in leaves])
        within_torch_error(y, y64, y_torch, dtype)
        for g, g64, gt in zip(grads, grads64, grads_torch):
            within_torch_error(g, g64, gt, dtype)


@pytest.mark.parametrize("mode", ["sum", "product", "gated"])
def test_combine_cpu_paths_every_activation_and_modality_count(mode):
    """The C++ kernel's float path (register arrays for M <= 8, M a constant for 2..4, streaming
    stores for outputs >= 2 MiB, a scalar tail when numel % 8 != 0) and its tile path (M = 9,
    float64, bfloat16), every activation, forward and backward against float64."""
    cases = [(torch.float32, 1, (5, 7)), (torch.float32, 2, (3, 41)), (torch.float32, 3, (613, 1031)),
             (torch.float32, 4, (2, 3, 11)), (torch.float32, 5, (7, 9)), (torch.float32, 9, (4, 13)),
             (torch.float64, 3, (3, 19)), (torch.bfloat16, 3, (5, 23))]
    for i, (dtype, num, shape) in enumerate(cases):
        activation = [None, "relu", "gelu", "silu", "tanh", "sigmoid"][i % 6]
        ps = [torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(num)]
        logits = torch.randn(num, dtype=torch.promote_types(dtype, torch.float32), requires_grad=True)
        gates = [torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(num)]
        extra = {"sum": [logits], "gated": gates, "product": []}[mode]
        leaves = ps + extra
        grad = torch.randn(shape, dtype=dtype)

        def run(b, tensors):
            k = {"sum": {"logits": tensors[num:][0] if mode == "sum" else None}, "gated": {"gate_logits": tensors[num:]},
                 "product": {}}[mode]
            y = mmfuse.combine_modalities(tensors[:num], mode, activation=activation, backend=b, **k)
            return y, torch.autograd.grad(y, tensors, grad.to(y.dtype))

        y, grads = run("cpu", leaves)
        y_torch, grads_torch = run("reference", leaves)
        y64, grads64 = run("reference", [t.detach().double().requires_grad_() for t in leaves])
        within_torch_error(y, y64, y_torch, dtype)
        for g, g64, gt in zip(grads, grads64, grads_torch):
            within_torch_error(g, g64, gt, dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU")
def test_cuda_kernels_edge_cases():
    """M = 1..8, odd and empty shapes, misaligned views (the scalar path), deterministic grad_weights."""
    dev = "cuda"
    for mode in ("sum", "product", "gated"):
        for num, shape, offset in ((1, (1, 1), 0), (2, (3, 37), 1), (4, (5, 8), 0), (8, (7, 33), 3), (3, (0, 5), 0)):
            def leaf(shape=shape, offset=offset):
                base = torch.randn(int(torch.Size(shape).numel()) + offset, device=dev)
                return base[offset:].view(shape).requires_grad_()  # contiguous, not 16-byte aligned if offset
            ps = [leaf() for _ in range(num)]
            logits = torch.randn(num, device=dev, requires_grad=True)
            gates = [leaf() for _ in range(num)]
            kwargs = {"sum": {"logits": logits}, "gated": {"gate_logits": gates}, "product": {}}[mode]
            leaves = ps + {"sum": [logits], "gated": gates, "product": []}[mode]
            grad = torch.randn(shape, device=dev)
            runs = []
            for backend in ("cuda", "cuda", "reference"):
                y = mmfuse.combine_modalities(ps, mode, activation="silu", backend=backend, **kwargs)
                runs.append((y, torch.autograd.grad(y, leaves, grad)))
            assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))  # run to run
            torch.testing.assert_close(runs[0][0], runs[2][0])
            for got, want in zip(runs[0][1], runs[2][1]):
                torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="at most 8 projected tensors"):
        mmfuse.combine_modalities([torch.randn(2, 3, device=dev)] * 9, "product", backend="cuda")

    for n in (0, 1, 29):
        xs = [torch.randn(n, d, device=dev, requires_grad=True) for d in (1, 3, 40)]
        weight = torch.randn(5, 44, device=dev, requires_grad=True)
        bias = torch.randn(5, device=dev, requires_grad=True)
        for activation in (None, "gelu"):
            got = mmfuse.fused_concat_linear(xs, weight, bias, activation, backend="cuda")
            want = mmfuse.fused_concat_linear(xs, weight, bias, activation, backend="reference")
            torch.testing.assert_close(got, want)
            grad = torch.randn_like(want)
            for g, w in zip(torch.autograd.grad(got, [*xs, weight, bias], grad),
                            torch.autograd.grad(want, [*xs, weight, bias], grad)):
                torch.testing.assert_close(g, w)


def test_fusion_gradcheck_cpu_kernels():
    xs = [torch.randn(11, d, dtype=torch.float64, requires_grad=True) for d in (1, 4)]
    weight = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, w, c: mmfuse.fused_concat_linear([a, b], w, c, "silu", backend="cpu"), (*xs, weight, bias)
    )
    ps = [torch.randn(4, 5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    logits = torch.randn(2, dtype=torch.float64, requires_grad=True)
    gates = [torch.randn(4, 5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    assert torch.autograd.gradcheck(
        lambda a, b, l: mmfuse.combine_modalities([a, b], "sum", logits=l, activation="tanh", backend="cpu"),
        (*ps, logits),
    )
    assert torch.autograd.gradcheck(
        lambda a, b, g, h: mmfuse.combine_modalities([a, b], "gated", gate_logits=[g, h], backend="cpu"),
        (*ps, *gates),
    )
    assert torch.autograd.gradcheck(
        lambda a, b: mmfuse.combine_modalities([a, b], "product", activation="sigmoid", backend="cpu"), tuple(ps)
    )


def test_product_gradient_exact_with_a_zero_factor():
    ps = [torch.tensor([[0.0, 2.0]], requires_grad=True), torch.tensor([[3.0, 0.0]], requires_grad=True)]
    mmfuse.combine_modalities(ps, "product", backend="cpu").sum().backward()
    assert ps[0].grad.tolist() == [[3.0, 0.0]] and ps[1].grad.tolist() == [[0.0, 2.0]]


def test_opcheck_fusion_ops():
    xs = [torch.randn(5, d, requires_grad=True) for d in (2, 3)]
    weight, bias = torch.randn(4, 5, requires_grad=True), torch.randn(4, requires_grad=True)
    for act in ("none", "gelu"):
        torch.library.opcheck(torch.ops.mmfuse.fused_concat_linear.default, (xs, weight, bias, act))
    # the backward ops are not themselves differentiable (no double backward): plain inputs
    preact = torch.randn(5, 4)
    torch.library.opcheck(torch.ops.mmfuse.fused_concat_linear_bwd.default,
                          (torch.randn(5, 4), [x.detach() for x in xs], weight.detach(), preact, "gelu", True))
    ps = [torch.randn(3, 4, requires_grad=True) for _ in range(2)]
    gates = [torch.randn(3, 4, requires_grad=True) for _ in range(2)]
    weights = torch.softmax(torch.randn(2), 0).requires_grad_()
    torch.library.opcheck(torch.ops.mmfuse.combine_modalities.default, (ps, "sum", weights, [], "silu"))
    torch.library.opcheck(torch.ops.mmfuse.combine_modalities.default, (ps, "gated", None, gates, "none"))
    torch.library.opcheck(torch.ops.mmfuse.combine_modalities.default, (ps, "product", None, [], "relu"))
    plain = [p.detach() for p in ps]
    for mode, w, g in (("sum", weights.detach(), []), ("gated", None, [g.detach() for g in gates]),
                       ("product", None, [])):
        torch.library.opcheck(torch.ops.mmfuse.combine_modalities_bwd.default,
                              (torch.randn(3, 4), plain, mode, w, g, "silu"))


def test_triton_backend_refuses_more_than_four_inputs_and_auto_falls_back(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    xs = [torch.randn(3, 2) for _ in range(5)]
    with pytest.raises(ValueError, match="at most 4 inputs"):
        mmfuse.fused_concat_linear(xs, torch.randn(4, 10), backend="triton")


def test_cuda_backend_names_what_it_cannot_take():
    from mmfuse.ops import fusion as ops

    nine = [torch.randn(2, 3)] * 9
    assert "at most 8 projected tensors" in ops._limits("cuda", nine, combine=True)
    assert ops._limits("cuda", nine, combine=False) is None  # one GEMM per input block: any number
    assert ops._limits("cuda", nine[:8], combine=True) is None
    with pytest.raises(ValueError, match="takes CUDA tensors"):
        mmfuse.combine_modalities(nine[:2], "product", backend="cuda")


def test_combine_modes_match_their_formulas():
    ps = [torch.randn(13, 9) for _ in range(3)]
    logits = torch.randn(3)
    gates = [torch.randn(13, 9) for _ in range(3)]
    w = torch.exp(logits) / torch.exp(logits).sum()
    torch.testing.assert_close(
        mmfuse.combine_modalities(ps, "sum", logits=logits, activation="tanh"),
        torch.tanh(w[0] * ps[0] + w[1] * ps[1] + w[2] * ps[2]),
    )
    torch.testing.assert_close(mmfuse.combine_modalities(ps, "product"), ps[0] * ps[1] * ps[2])
    torch.testing.assert_close(
        mmfuse.combine_modalities(ps, "gated", gate_logits=gates),
        sum(1 / (1 + torch.exp(-g)) * p for g, p in zip(gates, ps)),
    )


@pytest.mark.parametrize("mode", ["concat", "sum", "product", "gated"])
def test_feature_fusion_layer_matches_explicit_modules(mode):
    dims = (3, 1, 17)
    layer = mmfuse.nn.FeatureFusion(dims, 11, mode=mode, activation="silu")
    xs = [torch.randn(4, 6, d) for d in dims]
    got = layer(xs)
    assert got.shape == (4, 6, 11)
    if mode == "concat":
        want = F.silu(F.linear(torch.cat(xs, -1), layer.weight, layer.bias))
    else:
        ps = [lin(x) for lin, x in zip(layer.projections, xs)]
        if mode == "sum":
            w = torch.softmax(layer.modality_logits, 0)
            want = F.silu(sum(wi * p for wi, p in zip(w, ps)))
        elif mode == "product":
            want = F.silu(ps[0] * ps[1] * ps[2])
        else:
            want = F.silu(sum(torch.sigmoid(g(x)) * p for g, x, p in zip(layer.gates, xs, ps)))
    torch.testing.assert_close(got, want)
    got.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("mode", ["concat", "gated"])
def test_compile_fullgraph_of_packer_and_fusion(mode):
    torch._dynamo.reset()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.packer = mmfuse.nn.ModalityPacker(2, 8)
            self.fusion = mmfuse.nn.FeatureFusion([8, 8], 5, mode=mode, backend="cpu")

        def forward(self, a, b, la, lb):
            packed = self.packer([a, b], [la, lb])
            return self.fusion([packed.tokens, packed.tokens.flip(0)])

    model = Model()
    args = (torch.randn(3, 4, 8), torch.randn(3, 6, 8), torch.tensor([4, 1, 0]), torch.tensor([2, 6, 3]))
    compiled = torch.compile(model, fullgraph=True)
    got, want = compiled(*args), model(*args)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x, w: mmfuse.fused_concat_linear([], w), ValueError, "xs must be a non-empty list"),
        (lambda x, w: mmfuse.fused_concat_linear([x[0], x[1][:4]], w), ValueError, "xs\\[1\\] must have leading shape"),
        (lambda x, w: mmfuse.fused_concat_linear([x[0], x[1].double()], w), TypeError, "xs\\[1\\] must have dtype"),
        (lambda x, w: mmfuse.fused_concat_linear(x, w[:, :5]), ValueError, "weight must have shape \\(out, 7\\)"),
        (lambda x, w: mmfuse.fused_concat_linear(x, w.double()), TypeError, "weight must have dtype"),
        (lambda x, w: mmfuse.fused_concat_linear(x, w, torch.randn(3)), ValueError, "bias must have shape"),
        (lambda x, w: mmfuse.fused_concat_linear(x, w, activation="swish"), ValueError, "activation must be one of"),
        (lambda x, w: mmfuse.fused_concat_linear([x[0].long(), x[1]], w), TypeError, "xs\\[0\\] must have dtype"),
        (lambda x, w: mmfuse.combine_modalities([x[0], x[0]], "max"), ValueError, "mode must be one of"),
        (lambda x, w: mmfuse.combine_modalities([x[0], x[0]], "sum"), TypeError, "logits must be a torch.Tensor"),
        (lambda x, w: mmfuse.combine_modalities([x[0], x[0]], "gated", gate_logits=x[:1]), ValueError, "gate_logits must be a list of 2"),
        (lambda x, w: mmfuse.combine_modalities(x, "product"), ValueError, "projected\\[1\\] must have shape"),
        (lambda x, w: mmfuse.nn.FeatureFusion([3, 0], 4), ValueError, "in_dims must be"),
        (lambda x, w: mmfuse.nn.FeatureFusion([3, 4], 4, mode="max"), ValueError, "mode must be one of"),
        (lambda x, w: mmfuse.nn.FeatureFusion([3, 4], 4)(x[:1]), ValueError, "features must be a list of 2"),
        (lambda x, w: mmfuse.nn.FeatureFusion([3, 5], 4)(x), ValueError, "features\\[1\\] must end in width 5"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, error, match):
    xs = [torch.randn(5, 3), torch.randn(5, 4)]
    weight = torch.randn(6, 7)
    with pytest.raises(error, match=match):
        call(xs, weight)
