"""fused_concat_linear, combine_modalities and FeatureFusion against independent formulas."""
import pytest
import torch
import torch.nn.functional as F

import mmfuse

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


def test_compile_fullgraph_of_packer_and_fusion():
    torch._dynamo.reset()

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.packer = mmfuse.nn.ModalityPacker(2, 8)
            self.fusion = mmfuse.nn.FeatureFusion([8, 8], 5, mode="gated")

        def forward(self, a, b, la, lb):
            packed = self.packer([a, b], [la, lb])
            return self.fusion([packed.tokens, packed.tokens.flip(0)])

    model = Model()
    args = (torch.randn(3, 4, 8), torch.randn(3, 6, 8), torch.tensor([4, 1, 0]), torch.tensor([2, 6, 3]))
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(*args), model(*args))


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
