"""The cross-attention kernels (C++ CPU, Triton) against the float64 formula of test_attention.

Tolerances are DESIGN.md's attention rule: max|out - ref64| <= 2 * max|out_torch - ref64| + 1e-5
with out_torch plain attention in the kernel's dtype, gradients 3x; fp32 also within 1e-4
relative. Every element of every output is compared, including rows and keys that padding or
masks hide, and must be NaN-free.
"""
import itertools
import math

import pytest
import torch
from torch import nn

import mmfuse
import mmfuse.nn
from backend_params import backend_params, device_for
from test_attention import attention64, pack, plain_attention, qkv, visible_mask

NEG_INF = float("-inf")
CPU = backend_params("cpu")
# the Triton interpreter is slow: its cases are a few tiny ones
KERNELS = backend_params("cpu", "triton")
# the CUDA kernel takes float16/bfloat16 with head dims (64, 64), (128, 128), (128, 64); its emulator tests are
# test_cross_attention_emulator.py, these run on a GPU
CUDA = backend_params("cuda")


def masks_for(batch, len_k, gen=None):
    """kv_lens with a 0, a random and a full length; a random non-suffix key padding mask."""
    kv_lens = torch.tensor([0, int(torch.randint(1, len_k + 1, (), generator=gen))] + [len_k] * (batch - 2))
    return kv_lens, torch.rand(batch, len_k, generator=gen) < 0.3


def check_rule(name, ours, torch_dtype, ref64, factor):
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = (ours.double() - ref64).abs().max().item() if ours.numel() else 0.0
    budget = factor * (torch_dtype.double() - ref64).abs().max().item() + 1e-5 if ours.numel() else 0.0
    assert err <= budget, f"{name}: error {err:.3g} > budget {budget:.3g}"
    if ours.dtype == torch.float32:
        torch.testing.assert_close(ours.double(), ref64, atol=1e-5, rtol=1e-4)


def run_case(backend, batch, len_q, len_k, heads_q, heads_kv, head_dim, *, kv_lens, mask, causal,
             dtype=torch.float32, grads=False):
    device = device_for(backend)
    q, k, v = (t.to(device) for t in qkv(batch, len_q, len_k, heads_q, heads_kv, head_dim, dtype=dtype))
    scale = 1 / math.sqrt(head_dim)
    visible = visible_mask(batch, len_q, len_k, kv_lens=kv_lens, key_padding_mask=mask, causal=causal).to(device)
    kw = dict(kv_lens=None if kv_lens is None else kv_lens.to(device),
              key_padding_mask=None if mask is None else mask.to(device), causal=causal)
    inputs = [t.detach().requires_grad_(grads) for t in (q, k, v)]
    out, lse = mmfuse.cross_attention(*inputs, return_lse=True, backend=backend, **kw)
    inputs64 = [t.detach().cpu().double().requires_grad_(grads) for t in (q, k, v)]
    out64, lse64 = attention64(*inputs64, visible.cpu(), scale)
    rows = visible.any(-1)
    # rows without a visible key: plain attention gives NaN there, the rule's budget is 0
    torch_inputs = [t.detach().requires_grad_(grads) for t in (q, k, v)]
    out_torch = plain_attention(*torch_inputs, visible, scale).nan_to_num(0.0)
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    check_rule("out", out.cpu(), out_torch.cpu(), out64, 2)
    assert (out[~rows] == 0).all()
    assert torch.equal(lse.transpose(1, 2)[~rows].cpu(), torch.full_like(lse64.transpose(1, 2)[~rows], NEG_INF).float()
                       if dtype != torch.float64 else lse64.transpose(1, 2)[~rows])
    torch.testing.assert_close(lse.transpose(1, 2)[rows].cpu().double(), lse64.transpose(1, 2)[rows], atol=1e-5, rtol=1e-5)
    if grads:
        grad_out = torch.randn_like(out64).to(device)
        out.backward(grad_out.to(dtype))
        out64.backward(grad_out.cpu())
        out_torch.backward(grad_out.to(dtype))
        for name, ours, theirs, ref in zip(("dq", "dk", "dv"), inputs, torch_inputs, inputs64):
            check_rule(name, ours.grad.cpu(), theirs.grad.cpu().nan_to_num(0.0), ref.grad, 3)


# --------------------------------------------------------------------------- forward sweep


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("head_dim", [40, 64])
@pytest.mark.parametrize("len_k", [1, 32, 257, 577])
@pytest.mark.parametrize("len_q", [1, 77, 113])
def test_forward_sweep(backend, len_q, len_k, head_dim):
    kv_lens, mask = masks_for(3, len_k)
    for lens, m, causal in itertools.product([None, kv_lens], [None, mask], [False, True]):
        run_case(backend, 3, len_q, len_k, 8, 2, head_dim, kv_lens=lens, mask=m, causal=causal)


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("head_dim", [16, 24, 40, 128, 256])
def test_head_dims(backend, head_dim):
    kv_lens, mask = masks_for(3, 37)
    run_case(backend, 3, 19, 37, 4, 1, head_dim, kv_lens=kv_lens, mask=mask, causal=True, grads=True)


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes(backend, dtype):
    kv_lens, mask = masks_for(3, 257)
    run_case(backend, 3, 77, 257, 8, 2, 64, kv_lens=kv_lens, mask=mask, causal=False, dtype=dtype, grads=True)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("len_q, len_k, head_dim", [(1, 32, 40), (13, 1, 64), (19, 41, 40), (7, 257, 64)])
def test_small_cases_every_backend(backend, len_q, len_k, head_dim):
    kv_lens, mask = masks_for(3, len_k)
    for lens, m, causal in [(None, None, False), (kv_lens, mask, False), (kv_lens, None, True), (None, mask, True)]:
        run_case(backend, 3, len_q, len_k, 4, 2, head_dim, kv_lens=lens, mask=m, causal=causal)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_small_gradients_every_backend(backend, causal):
    kv_lens, mask = masks_for(3, 37)
    run_case(backend, 3, 21, 37, 4, 2, 40, kv_lens=kv_lens, mask=mask, causal=causal, grads=True)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_small_half_precision_every_backend(backend, dtype):
    kv_lens, mask = masks_for(3, 33)
    run_case(backend, 3, 17, 33, 2, 1, 24, kv_lens=kv_lens, mask=mask, causal=True, dtype=dtype, grads=True)


@pytest.mark.parametrize("backend", KERNELS)
def test_empty_inputs_every_backend(backend):
    device = device_for(backend)
    q, k, v = (t.to(device).requires_grad_() for t in qkv(2, 3, 0, 2, 1, 8))  # no keys at all
    out, lse = mmfuse.cross_attention(q, k, v, return_lse=True, backend=backend)
    out.sum().backward()
    assert (out == 0).all() and (lse == NEG_INF).all() and (q.grad == 0).all()
    q, k, v = (t.to(device) for t in qkv(0, 3, 4, 2, 1, 8))  # empty batch
    assert mmfuse.cross_attention(q, k, v, return_lse=True, backend=backend)[1].shape == (0, 2, 3)
    empty_cu = torch.zeros(1, dtype=torch.int32, device=device)
    out, lse = mmfuse.cross_attention_varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), empty_cu, empty_cu,
                                             0, 0, return_lse=True, backend=backend)
    assert out.shape == (0, 2, 8) and lse.shape == (2, 0)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("len_q, len_k", [(1, 32), (77, 257), (113, 577), (29, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_gradients(backend, len_q, len_k, causal):
    kv_lens, mask = masks_for(3, len_k)
    run_case(backend, 3, len_q, len_k, 8, 2, 40, kv_lens=kv_lens, mask=mask, causal=causal, grads=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch, heads_kv, threads", [(3, 2, 2), (5, 4, 1)], ids=["two-pass", "one-pass"])
def test_cpu_backward_both_schedules(batch, heads_kv, threads, causal):
    """The C++ backward runs in one pass per (sample, kv head) when there are >= 4 such pairs per
    thread, else in two passes (dK/dV per key block, then dQ); both against float64."""
    kv_lens, mask = masks_for(batch, 131)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_case("cpu", batch, 71, 131, 8, heads_kv, 40, kv_lens=kv_lens, mask=mask, causal=causal, grads=True)
        run_case("cpu", batch, 131, 71, 4, heads_kv, 64, kv_lens=None, mask=None, causal=causal, grads=True)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("backend, len_q, len_k", [("cpu", 70, 300), pytest.param("triton", 20, 37, marks=pytest.mark.triton)])
def test_gradient_through_lse_and_determinism(backend, len_q, len_k):
    device = device_for(backend)
    q, k, v = (t.to(device).requires_grad_() for t in qkv(3, len_q, len_k, 8, 2, 40))
    kv_lens, mask = (t.to(device) for t in masks_for(3, len_k))
    grads = []
    for _ in range(2):
        out, lse = mmfuse.cross_attention(q, k, v, kv_lens=kv_lens, key_padding_mask=mask, causal=True,
                                          return_lse=True, backend=backend)
        grads.append(torch.autograd.grad((out * out).sum() + (lse.nan_to_num(0, 0, 0) * 0.5).sum(), (q, k, v)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    ref = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = mmfuse.cross_attention(*ref, kv_lens=kv_lens, key_padding_mask=mask, causal=True, return_lse=True,
                                      backend="reference")
    expected = torch.autograd.grad((out * out).sum() + (lse.nan_to_num(0, 0, 0) * 0.5).sum(), ref)
    for a, b in zip(grads[0], expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_gradcheck_float64_cpu():
    q, k, v = qkv(3, 5, 6, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    kv_lens, mask = torch.tensor([0, 4, 6]), torch.rand(3, 6) < 0.3

    def masked_causal(q, k, v):
        return mmfuse.cross_attention(q, k, v, kv_lens=kv_lens, key_padding_mask=mask, causal=True,
                                      return_lse=True, backend="cpu")

    def with_scale(q, k, v):
        return mmfuse.cross_attention(q, k, v, kv_lens=torch.tensor([1, 4, 6]), scale=0.7, backend="cpu")

    cu_q = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 11], dtype=torch.int32)
    qv, kv_, vv = (torch.randn(n, h, 3, dtype=torch.float64, requires_grad=True) for n, h in ((7, 4), (11, 2), (11, 2)))

    def varlen(q, k, v):
        return mmfuse.cross_attention_varlen(q, k, v, cu_q, cu_k, 4, 5, causal=True, return_lse=True, backend="cpu")

    # the -inf lse of empty rows has no finite difference; compare the finite part
    def finite(fn):
        return lambda *a: tuple(t.nan_to_num(0.0, 0.0, 0.0) for t in fn(*a))

    assert torch.autograd.gradcheck(finite(masked_causal), (q, k, v))
    assert torch.autograd.gradcheck(with_scale, (q, k, v))
    assert torch.autograd.gradcheck(finite(varlen), (qv, kv_, vv))


# --------------------------------------------------------------------------- varlen


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_equals_padded(backend, causal):
    q_lens, k_lens = [5, 0, 20, 1, 9], [7, 3, 0, 33, 4]
    batch = len(q_lens)
    q_pad, k_pad, v_pad = (t.to(device_for(backend)) for t in qkv(batch, max(q_lens), max(k_lens), 4, 2, 40))
    q, cu_q = pack(q_pad, q_lens)
    k, cu_k = pack(k_pad, k_lens)
    v, _ = pack(v_pad, k_lens)
    cu_q, cu_k = cu_q.to(q.device), cu_k.to(q.device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = mmfuse.cross_attention_varlen(q, k, v, cu_q, cu_k, None, None, causal=causal, return_lse=True,
                                             backend=backend)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    for b in range(batch):
        rows_q, rows_k = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        q_b, k_b, v_b = (t[rows][None].detach().requires_grad_() for t, rows in ((q, rows_q), (k, rows_k), (v, rows_k)))
        out_b, lse_b = mmfuse.cross_attention(q_b, k_b, v_b, causal=causal, return_lse=True, backend=backend)
        out_b.backward(grad_out[rows_q][None])
        torch.testing.assert_close(out[rows_q], out_b[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(lse[:, rows_q], lse_b[0], atol=1e-6, rtol=1e-5)
        for packed, single, rows in ((q, q_b, rows_q), (k, k_b, rows_k), (v, v_b, rows_k)):
            torch.testing.assert_close(packed.grad[rows], single.grad[0], atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- CUDA kernel


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_kernel_forward_and_gradients(backend, dtype, head_dim):
    for len_q, len_k in [(1, 17), (17, 1), (64, 64), (77, 130), (130, 77)]:
        kv_lens, mask = masks_for(3, len_k)
        mask[2] = True  # a sample with every key hidden
        for lens, m, causal in [(None, None, False), (kv_lens, mask, False), (kv_lens, None, True), (None, mask, True)]:
            run_case(backend, 3, len_q, len_k, 8, 2, head_dim, kv_lens=lens, mask=m, causal=causal, dtype=dtype,
                     grads=True)


@pytest.mark.parametrize("backend", CUDA)
def test_cuda_kernel_lse_gradient_and_determinism(backend):
    q, k, v = (t.cuda().half().requires_grad_() for t in qkv(3, 77, 130, 8, 2, 64))
    kv_lens, mask = (t.cuda() for t in masks_for(3, 130))
    grads = []
    for _ in range(2):
        out, lse = mmfuse.cross_attention(q, k, v, kv_lens=kv_lens, key_padding_mask=mask, causal=True,
                                          return_lse=True, backend=backend)
        grads.append(torch.autograd.grad((out.float() ** 2).sum() + (lse.nan_to_num(0, 0, 0) * 0.5).sum(), (q, k, v)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out, lse = mmfuse.cross_attention(*ref, kv_lens=kv_lens, key_padding_mask=mask, causal=True, return_lse=True,
                                      backend="reference")
    expected = torch.autograd.grad((out * out).sum() + (lse.nan_to_num(0, 0, 0) * 0.5).sum(), ref)
    for a, b in zip(grads[0], expected):
        torch.testing.assert_close(a.double(), b, atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", CUDA)
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_kernel_varlen_equals_padded(backend, causal):
    q_lens, k_lens = [5, 0, 77, 1, 9], [7, 3, 0, 130, 4]
    batch = len(q_lens)
    q_pad, k_pad, v_pad = (t.cuda().to(torch.bfloat16) for t in qkv(batch, max(q_lens), max(k_lens), 4, 2, 128))
    q, cu_q = pack(q_pad, q_lens)
    k, cu_k = pack(k_pad, k_lens)
    v, _ = pack(v_pad, k_lens)
    cu_q, cu_k = cu_q.cuda(), cu_k.cuda()
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = mmfuse.cross_attention_varlen(q, k, v, cu_q, cu_k, None, None, causal=causal, return_lse=True,
                                             backend=backend)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    for b in range(batch):
        rows_q, rows_k = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        q_b, k_b, v_b = (t[rows][None].detach().requires_grad_() for t, rows in ((q, rows_q), (k, rows_k), (v, rows_k)))
        out_b, lse_b = mmfuse.cross_attention(q_b, k_b, v_b, causal=causal, return_lse=True, backend=backend)
        out_b.backward(grad_out[rows_q][None])
        torch.testing.assert_close(out[rows_q], out_b[0])
        torch.testing.assert_close(lse[:, rows_q], lse_b[0])
        for packed, single, rows in ((q, q_b, rows_q), (k, k_b, rows_k), (v, v_b, rows_k)):
            torch.testing.assert_close(packed.grad[rows], single.grad[0])


@pytest.mark.parametrize("backend", CUDA)
def test_cuda_kernel_empty_inputs(backend):
    q, k, v = (t.cuda().half().requires_grad_() for t in qkv(2, 3, 0, 2, 1, 64))  # no keys at all
    out, lse = mmfuse.cross_attention(q, k, v, return_lse=True, backend=backend)
    out.float().sum().backward()
    assert (out == 0).all() and (lse == NEG_INF).all() and (q.grad == 0).all()
    q, k, v = (t.cuda().half() for t in qkv(0, 3, 4, 2, 1, 64))  # empty batch
    assert mmfuse.cross_attention(q, k, v, return_lse=True, backend=backend)[1].shape == (0, 2, 3)


def test_cuda_backend_names_what_it_cannot_take():
    q, k, v = qkv(1, 3, 5, 2, 1, 40)
    with pytest.raises(ValueError, match="backend 'cuda' cannot run this case"):
        mmfuse.cross_attention(q, k, v, backend="cuda")
    reason = mmfuse.ops.attention._unsupported
    assert "float16 and bfloat16" in reason(q, 1)("cuda")
    assert "(head dim, value head dim) in" in reason(q.half(), 1)("cuda")
    assert reason(torch.empty(1, 3, 2, 128, dtype=torch.bfloat16), 1)("cuda") is None
    assert reason(torch.empty(1, 3, 2, 128, dtype=torch.bfloat16), 1, dim_v=64)("cuda") is None
    assert "got (64, 128)" in reason(torch.empty(1, 3, 2, 64, dtype=torch.bfloat16), 1, dim_v=128)("cuda")
    assert "at most 65535 samples" in reason(torch.empty(70000, 2, 64, dtype=torch.half), 70000)("cuda")


# --------------------------------------------------------------------------- op contract


@pytest.mark.parametrize("call", [
    lambda q, k, v: mmfuse.cross_attention(q, k, v, allow_tf32=1),
    lambda q, k, v: mmfuse.cross_attention_varlen(q[0], k[0], v[0], *[torch.tensor([0, 3], dtype=torch.int32)] * 2,
                                                  3, 3, allow_tf32=None),
])
def test_allow_tf32_must_be_bool(call):
    with pytest.raises(TypeError, match="allow_tf32 must be a bool"):
        call(*qkv(1, 3, 3, 2, 1, 8))


@pytest.mark.triton
def test_triton_refuses_float64():
    q, k, v = qkv(1, 3, 3, 2, 1, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="Triton kernels take float16, bfloat16 and float32"):
        mmfuse.cross_attention(q.to(device_for("triton")), k.to(device_for("triton")), v.to(device_for("triton")),
                               backend="triton")


def test_auto_picks_the_cpu_kernel(monkeypatch):
    calls = []
    fwd = torch.ops.mmfuse.cross_attention_fwd
    monkeypatch.setattr(torch.ops.mmfuse, "cross_attention_fwd", lambda *a: calls.append(1) or fwd(*a))
    q, k, v = qkv(2, 3, 5, 2, 1, 8)
    mmfuse.cross_attention(q, k, v)
    assert calls == [1]


def test_opcheck():
    q, k, v = qkv(3, 7, 11, 4, 2, 40, requires_grad=True)
    kv_lens, mask = masks_for(3, 11)
    out, lse = torch.ops.mmfuse.cross_attention_fwd(q, k, v, kv_lens, mask, 0.3, True)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    cu_q = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 11], dtype=torch.int32)
    qv, kv_, vv = (t[0].detach().requires_grad_() for t in (q, k, v))
    out_v, lse_v = torch.ops.mmfuse.cross_attention_varlen_fwd(qv, kv_, vv, cu_q, cu_k, 4, 5, 0.3, True)
    cases = [
        (torch.ops.mmfuse.cross_attention_fwd, (q, k, v, kv_lens, mask, 0.3, True)),
        (torch.ops.mmfuse.cross_attention_fwd, (q, k, v, None, None, 0.5, False)),
        (torch.ops.mmfuse.cross_attention_bwd,
         (grad_out, grad_lse, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), kv_lens, mask, 0.3, True)),
        (torch.ops.mmfuse.cross_attention_varlen_fwd, (qv, kv_, vv, cu_q, cu_k, 4, 5, 0.3, True)),
        (torch.ops.mmfuse.cross_attention_varlen_bwd,
         (torch.randn_like(out_v), None, qv.detach(), kv_.detach(), vv.detach(), out_v.detach(), lse_v.detach(), cu_q, cu_k,
          4, 5, 0.3, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_layer_compiles_fullgraph_on_the_cpu_kernel():
    torch._dynamo.reset()

    class TextToImage(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mmfuse.nn.CrossModalAttention(24, 4, kdim=20, vdim=20, num_kv_heads=2, backend="cpu")
            self.norm = nn.LayerNorm(24)

        def forward(self, text, image, kv_lens, mask):
            return self.norm(text + self.attn(text, image, kv_lens=kv_lens, key_padding_mask=mask, need_weights=False)[0])

    model = TextToImage()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    args = (torch.randn(3, 7, 24), torch.randn(3, 13, 20), torch.tensor([13, 0, 6]), torch.rand(3, 13) < 0.3)
    expected = model(*args)
    got = compiled(*args)
    torch.testing.assert_close(got, expected)
    got.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_layer_matches_multihead_attention_on_the_cpu_kernel():
    mha = nn.MultiheadAttention(48, 6, batch_first=True).eval()
    layer = mmfuse.nn.CrossModalAttention(48, 6, backend="cpu").eval()
    layer.load_state_dict(mha.state_dict())
    query, key = torch.randn(3, 11, 48), torch.randn(3, 19, 48)
    mask = torch.rand(3, 19) < 0.4
    mask[:, 0] = False
    with torch.no_grad():
        torch.testing.assert_close(layer(query, key, key, key_padding_mask=mask, need_weights=False)[0],
                                   mha(query, key, key, key_padding_mask=mask, need_weights=False)[0],
                                   atol=2e-6, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_varlen_op_refuses_bad_cu_seqlens_instead_of_faulting():
    """Called directly (no Python checks), the CUDA varlen op validates cu_seqlens on the device."""
    q = torch.randn(7, 2, 64, device="cuda", dtype=torch.half)
    k, v = torch.randn_like(q), torch.randn_like(q)
    good = torch.tensor([0, 3, 7], dtype=torch.int32, device="cuda")
    op = torch.ops.mmfuse.cross_attention_varlen_fwd
    cases = [
        (torch.tensor([0, 3, 9], dtype=torch.int32, device="cuda"), good, 4, 4, "cu_seqlens_q must start at 0"),
        (good, torch.tensor([1, 3, 7], dtype=torch.int32, device="cuda"), 4, 4, "cu_seqlens_k must start at 0"),
        (good, good, 3, 4, "steps <= max_seqlen_q \\(3\\)"),
    ]
    for cu_q, cu_k, max_q, max_k, match in cases:
        with pytest.raises(RuntimeError, match=match):
            op(q, k, v, cu_q, cu_k, max_q, max_k, 0.125, False)
    out, lse = op(q, k, v, good, good, 4, 4, 0.125, False)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
