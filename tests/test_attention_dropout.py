"""Attention dropout (Philox4x32-10 stream) and the in-kernel attention mask of the fused
cross-attention kernels (C++ CPU, Triton), against the pure-PyTorch reference.

The reference's ``philox_keep`` is the oracle of the dropout mask: it is checked against the
published Philox4x32-10 known-answer vectors, and every kernel's mask against it bit for bit.
"""
import math

import pytest
import torch

import mmfuse
from backend_params import backend_params, device_for
from mmfuse.contract.attention import keep_threshold
from mmfuse.reference import attention as ref

CPU = backend_params("cpu")
KERNELS = backend_params("cpu", "triton")
NEG_INF = float("-inf")
# a seed with the top bit set and an offset past 2^32: both 32-bit halves of each are used
PHILOX = (-7046029254386353131, 2**40 + 12345)


def fwd_op(backend):
    if backend == "triton":
        from mmfuse.triton import cross_attention as tri

        return lambda *a: tri.cross_attention_fwd_triton(*a, allow_tf32=False)
    return torch.ops.mmfuse.cross_attention_fwd


def bwd_op(backend):
    if backend == "triton":
        from mmfuse.triton import cross_attention as tri

        return lambda *a: tri.cross_attention_bwd_triton(*a, allow_tf32=False)
    return torch.ops.mmfuse.cross_attention_bwd


def qkv(batch, len_q, len_k, heads_q, heads_kv, head_dim, dtype=torch.float32, device="cpu"):
    return (
        torch.randn(batch, len_q, heads_q, head_dim, dtype=dtype, device=device),
        torch.randn(batch, len_k, heads_kv, head_dim, dtype=dtype, device=device),
        torch.randn(batch, len_k, heads_kv, head_dim, dtype=dtype, device=device),
    )


# ----------------------------------------------------------------------------- the stream


def test_reference_philox_matches_random123_known_answers():
    # Random123's kat_vectors for philox4x32_10: (counter, key) -> output
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in cases:
        words = ref.philox4x32_10(tuple(torch.tensor([c]) for c in counter), key)
        assert [int(w) for w in words] == list(expected)


def test_keep_fraction_and_uniform_words():
    p = 0.3
    philox = torch.tensor(PHILOX)
    words = ref.philox_uniform(philox, 3, 5, 67, 131, torch.device("cpu"))  # 129k draws
    n = words.numel()
    keep = (words >= keep_threshold(p)).double().mean().item()
    expected = 1 - keep_threshold(p) / 2**32
    assert abs(keep - expected) < 5 * math.sqrt(expected * (1 - expected) / n)
    # top byte uniform: chi-square with 255 degrees of freedom, mean 255, sd 22.6; 6 sd bound
    counts = torch.bincount((words >> 24).flatten(), minlength=256).double()
    chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum().item()
    assert chi2 < 255 + 6 * math.sqrt(2 * 255)


def kernel_keep_mask(backend, batch, len_q, len_k, heads_q, heads_kv, p, philox, causal=False):
    """The kernel's keep mask (B, Hq, Lq, Lk), read off its output: q = 0 makes every probability
    1/Lk and v = one-hot rows (head dim = Lk) makes out[b, i, h, j] = P~[b, h, i, j]."""
    device = device_for(backend)
    q = torch.zeros(batch, len_q, heads_q, len_k, device=device)
    v = torch.eye(len_k, device=device)[None, :, None, :].expand(batch, len_k, heads_kv, len_k).contiguous()
    k = torch.randn(batch, len_k, heads_kv, len_k, device=device)
    out, _ = fwd_op(backend)(q, k, v, None, None, 1.0, causal, None, p, philox.to(device))
    return (out.permute(0, 2, 1, 3) > 0).cpu()


@pytest.mark.parametrize("backend, len_k", [("cpu", 37), ("cpu", 300), pytest.param("triton", 37, marks=pytest.mark.triton)])
def test_kernel_masks_equal_the_reference_bit_for_bit(backend, len_k):
    """37 keys: one full 32-key Philox group (the C++ kernel's AVX2 path) and a partial one; 300
    keys: two C++ key blocks (256 + 44)."""
    batch, len_q, heads_q, heads_kv, p = 3, 7, 4, 2, 0.35
    philox = torch.tensor(PHILOX)
    keep = kernel_keep_mask(backend, batch, len_q, len_k, heads_q, heads_kv, p, philox)
    expected = ref.philox_keep(philox, p, batch, heads_q, len_q, len_k, torch.device("cpu"))
    assert torch.equal(keep, expected)
    assert 0.5 < keep.double().mean().item() < 0.8


@pytest.mark.triton
def test_cpu_and_triton_drop_the_same_elements():
    batch, len_q, len_k, heads, p = 3, 5, 19, 2, 0.4
    philox = torch.tensor([12345, 678])
    cpu = kernel_keep_mask("cpu", batch, len_q, len_k, heads, heads, p, philox)
    tri = kernel_keep_mask("triton", batch, len_q, len_k, heads, heads, p, philox)
    assert torch.equal(cpu, tri)


# ----------------------------------------------------------------------------- values


def reference64(q, k, v, *, scale, causal=False, kv_lens=None, key_padding_mask=None, attn_mask=None, p=0.0,
                philox=None):
    bias = None
    if attn_mask is not None:
        m = attn_mask.cpu()
        m = m if m.dim() == 4 else m[None, None]
        bias = torch.zeros(m.shape, dtype=torch.float64).masked_fill(m, NEG_INF) if m.dtype == torch.bool else m.double()
    out, lse, _ = ref.cross_attention(
        q, k, v, scale=scale, causal=causal, kv_lens=None if kv_lens is None else kv_lens.cpu(),
        key_padding_mask=None if key_padding_mask is None else key_padding_mask.cpu(),
        attn_bias=bias, dropout_p=p, philox=philox,
    )
    return out, lse


def masks(kind, batch, heads, len_q, len_k, device):
    """bool / 0,-inf / general float masks with fully masked rows (rows 0 and 2 of sample 1)."""
    shape = {"2d": (len_q, len_k), "b1": (batch, 1, len_q, len_k), "bh": (batch, heads, len_q, len_k),
             "1h": (1, heads, len_q, len_k)}
    if kind == "bool":
        m = torch.rand(batch, heads, len_q, len_k) < 0.4
        m[1, :, 0] = True
        m[1, :, 2] = True
    elif kind == "neginf":
        m = torch.zeros(batch, heads, len_q, len_k).masked_fill(torch.rand(batch, heads, len_q, len_k) < 0.4, NEG_INF)
        m[1, :, 0] = NEG_INF
        m[1, :, 2] = NEG_INF
    else:  # a general float bias, partly -inf
        m = torch.randn(batch, heads, len_q, len_k).masked_fill(torch.rand(batch, heads, len_q, len_k) < 0.2, NEG_INF)
        m[1, :, 2] = NEG_INF
    return m, shape


def mask_params():
    """Every (kind, layout, dropout) on the C++ kernel; the interpreter is slow, so Triton takes the
    2d and bh layouts with bool and float masks (the code the others reach too)."""
    params = []
    for kind in ("bool", "neginf", "float"):
        for layout in ("2d", "b1", "bh", "1h"):
            for dropout_p in (0.0, 0.25):
                params.append(pytest.param("cpu", kind, layout, dropout_p))
                if kind != "neginf" and layout in ("2d", "bh"):
                    params.append(pytest.param("triton", kind, layout, dropout_p, marks=pytest.mark.triton))
    return params


@pytest.mark.parametrize("backend, kind, layout, dropout_p", mask_params())
def test_in_kernel_mask_forward_and_backward_match_float64(backend, kind, layout, dropout_p):
    device = device_for(backend)
    batch, len_q, len_k, heads_q, heads_kv, dim = 3, 11, 23, 4, 2, 40
    full, shape = masks(kind, batch, heads_q, len_q, len_k, device)
    target = shape[layout]
    mask = full[: target[0], : target[1]] if len(target) == 4 else full[0, 0]
    if len(target) == 4 and target[0] == 1:
        mask = full[:1]
    mask = mask.reshape(target).contiguous().to(device)
    q, k, v = qkv(batch, len_q, len_k, heads_q, heads_kv, dim, device=device)
    kv_lens = torch.tensor([len_k, 17, 9], device=device)
    philox = torch.tensor(PHILOX) if dropout_p else None
    scale = 1 / math.sqrt(dim)
    args = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = fwd_op(backend)(*args, kv_lens, None, scale, False, mask,
                               dropout_p, None if philox is None else philox.to(device))
    grad = torch.randn_like(out)
    out.backward(grad)
    args64 = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    out64, lse64 = reference64(*args64, scale=scale, kv_lens=kv_lens, attn_mask=mask, p=dropout_p, philox=philox)
    out64.backward(grad.cpu().double())
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.cpu().double(), out64, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse.cpu().double(), lse64, atol=2e-5, rtol=1e-4)
    for name, a, b in zip("qkv", args, args64):
        assert torch.isfinite(a.grad).all(), name
        torch.testing.assert_close(a.grad.cpu().double(), b.grad, atol=5e-5, rtol=3e-4, msg=f"d{name}")
    if kind != "float" and layout in ("bh", "b1"):  # fully masked rows: output 0, lse -inf, dq 0
        assert (out[1, 0] == 0).all() and (lse[1, :, 0] == NEG_INF).all() and (args[0].grad[1, 0] == 0).all()


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_with_key_masks_and_causal_matches_the_reference(backend, causal):
    device = device_for(backend)
    batch, len_q, len_k, heads_q, heads_kv, dim = 3, 13, 29, 2, 1, 40
    if backend == "triton":
        len_q, len_k, dim = 7, 11, 16
    q, k, v = qkv(batch, len_q, len_k, heads_q, heads_kv, dim, device=device)
    kv_lens = torch.tensor([0, len_k - 3, len_k], device=device)
    kpm = (torch.rand(batch, len_k) < 0.2).to(device)
    scale = 0.37
    for seed in (1, 2):
        torch.manual_seed(seed)
        args = [t.detach().requires_grad_() for t in (q, k, v)]
        out = mmfuse.cross_attention(*args, kv_lens=kv_lens, key_padding_mask=kpm, causal=causal, scale=scale,
                                     dropout_p=0.2, backend=backend)
        grad = torch.randn_like(out)
        out.backward(grad)
        torch.manual_seed(seed)  # the same philox draw
        args64 = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
        out64 = mmfuse.cross_attention(*args64, kv_lens=kv_lens.cpu(), key_padding_mask=kpm.cpu(), causal=causal,
                                       scale=scale, dropout_p=0.2, backend="reference")
        out64.backward(grad.cpu().double())
        torch.testing.assert_close(out.cpu().double(), out64, atol=2e-5, rtol=1e-4)
        for a, b in zip(args, args64):
            torch.testing.assert_close(a.grad.cpu().double(), b.grad, atol=5e-5, rtol=3e-4)


# ----------------------------------------------------------------------------- randomness


@pytest.mark.parametrize("backend", CPU + ["reference"])
def test_same_seed_reproduces_and_another_seed_changes(backend):
    q, k, v = qkv(3, 13, 31, 4, 2, 40)

    def run(seed):
        torch.manual_seed(seed)
        args = [t.detach().requires_grad_() for t in (q, k, v)]
        out = mmfuse.cross_attention(*args, dropout_p=0.1, backend=backend)
        out.backward(torch.ones_like(out))
        return [out.detach()] + [a.grad for a in args]

    first, again, other = run(7), run(7), run(8)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    for a, b in zip(first, other):
        assert not torch.allclose(a, b)
    # consecutive calls draw fresh (seed, offset): two calls in one run differ
    torch.manual_seed(7)
    a = mmfuse.cross_attention(q, k, v, dropout_p=0.1, backend=backend)
    b = mmfuse.cross_attention(q, k, v, dropout_p=0.1, backend=backend)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU)
def test_dropped_output_is_unbiased(backend):
    """Mean over N draws -> the undropped output. Per element, out = sum_j P_j keep_j v_j / (1 - p)
    has variance sum_j P_j^2 v_j^2 p / (1 - p) (independent keeps), so z = (mean - out0) /
    sqrt(var / N) is ~N(0, 1): max |z| over the 2k elements < 5 (a false failure has probability
    ~1e-3 for independent elements; the run is seeded, so it is deterministic), and mean z^2 is
    1 within 0.25 (its sd is ~0.03 for independent elements, larger as elements of a row share keeps)."""
    p, draws = 0.3, 300
    batch, len_q, len_k, heads, dim = 3, 7, 23, 2, 24
    q, k, v = qkv(batch, len_q, len_k, heads, heads, dim, dtype=torch.float64)
    out0, _, probs = ref.cross_attention(q, k, v, scale=0.4)
    total = torch.zeros_like(out0)
    for _ in range(draws):
        total += mmfuse.cross_attention(q, k, v, scale=0.4, dropout_p=p, backend=backend)
    mean = total / draws
    # var[b, i, h, d] = sum_j P[b, h, i, j]^2 v[b, j, h, d]^2 p / (1 - p)
    var = torch.einsum("bhij,bjhd->bihd", probs**2, v**2) * p / (1 - p)
    z = (mean - out0) / (var / draws).sqrt()
    assert z.abs().max().item() < 5.0
    assert abs((z**2).mean().item() - 1.0) < 0.25


def test_gradcheck_float64_with_fixed_philox_and_mask():
    batch, len_q, len_k, heads_q, heads_kv, dim = 2, 5, 7, 2, 1, 6
    q, k, v = (t.requires_grad_() for t in qkv(batch, len_q, len_k, heads_q, heads_kv, dim, dtype=torch.float64))
    philox = torch.tensor(PHILOX)
    bias = torch.randn(batch, 1, len_q, len_k, dtype=torch.float64).masked_fill(torch.rand(batch, 1, len_q, len_k) < 0.2, NEG_INF)
    bias[0, 0, 1] = NEG_INF  # a fully masked row
    kv_lens = torch.tensor([len_k, 4])

    def f(q, k, v):
        out, lse = torch.ops.mmfuse.cross_attention_fwd(q, k, v, kv_lens, None, 0.5, True, bias, 0.3, philox)
        return out, lse.masked_fill(lse == NEG_INF, 0.0)  # -inf on the empty row: finite differences give NaN

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_opcheck_with_mask_and_dropout():
    q, k, v = (t.requires_grad_() for t in qkv(3, 7, 11, 4, 2, 40))
    mask = torch.rand(3, 1, 7, 11) < 0.3
    philox = torch.tensor(PHILOX)
    out, lse = torch.ops.mmfuse.cross_attention_fwd(q, k, v, None, None, 0.3, False, mask, 0.2, philox)
    cases = [
        (torch.ops.mmfuse.cross_attention_fwd, (q, k, v, None, None, 0.3, False, mask, 0.2, philox)),
        (torch.ops.mmfuse.cross_attention_fwd, (q, k, v, torch.tensor([3, 0, 11]), None, 0.3, True,
                                                torch.randn(7, 11), 0.0, None)),
        (torch.ops.mmfuse.cross_attention_bwd,
         (torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(), v.detach(), out.detach(),
          lse.detach(), None, None, 0.3, False, mask, 0.2, philox)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compiles_fullgraph_on_the_cpu_kernel_with_dropout_and_mask():
    torch._dynamo.reset()
    q, k, v = qkv(3, 7, 13, 2, 2, 40)
    mask = torch.rand(7, 13) < 0.3

    def f(q, k, v):
        return mmfuse.cross_attention(q, k, v, attn_mask=mask, dropout_p=0.2, backend="cpu")

    compiled = torch.compile(f, fullgraph=True)
    args = [t.detach().requires_grad_() for t in (q, k, v)]
    out = compiled(*args)
    out.sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(a.grad).all() for a in args)
    # the compiled graph drew a philox pair and dropped elements: the result is not the undropped one
    assert not torch.allclose(out, mmfuse.cross_attention(q, k, v, attn_mask=mask, backend="cpu"))
    # with inductor's RNG replaced by eager's (fallback_random), one seed gives eager's result
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(f, fullgraph=True)
        torch.manual_seed(3)
        got = compiled(q, k, v)
    torch.manual_seed(3)
    torch.testing.assert_close(got, f(q, k, v))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dropout_p=1.0), ValueError, r"dropout_p must lie in \[0, 1\), got 1.0"),
    (dict(dropout_p=-0.1), ValueError, r"dropout_p must lie in \[0, 1\)"),
    (dict(dropout_p=True), TypeError, r"dropout_p must be a float"),
    (dict(dropout_p="0.1"), TypeError, r"dropout_p must be a float"),
    (dict(attn_mask=torch.zeros(5, 7, dtype=torch.int32)), TypeError, r"attn_mask must have dtype"),
    (dict(attn_mask=torch.zeros(5, 8, dtype=torch.bool)), ValueError, r"attn_mask must have shape .*got \(5, 8\)"),
    (dict(attn_mask=torch.zeros(2, 2, 5, 7)), ValueError, r"attn_mask must have shape .*got \(2, 2, 5, 7\)"),
    (dict(attn_mask=torch.zeros(1, 5, 7)), ValueError, r"attn_mask must have 2 or 4 dimensions"),
])
def test_bad_input_names_the_argument(kwargs, error, match):
    q, k, v = qkv(3, 5, 7, 4, 2, 8)
    with pytest.raises(error, match=match):
        mmfuse.cross_attention(q, k, v, **kwargs)


def test_kernel_refuses_missing_philox_and_bad_mask():
    q, k, v = qkv(2, 5, 7, 2, 2, 8)
    with pytest.raises(RuntimeError, match="dropout needs philox"):
        torch.ops.mmfuse.cross_attention_fwd(q, k, v, None, None, 0.3, False, None, 0.2, None)
    with pytest.raises(RuntimeError, match="attn_mask must be a bool or float"):
        torch.ops.mmfuse.cross_attention_fwd(q, k, v, None, None, 0.3, False, torch.zeros(5, 6), 0.0, None)


def test_mask_requiring_grad_gets_its_gradient_from_the_cpu_kernel():
    q, k, v = qkv(2, 5, 7, 2, 2, 8, dtype=torch.float64)
    bias = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    grads = []
    for backend in ("cpu", "reference"):
        out = mmfuse.cross_attention(q, k, v, attn_mask=bias, backend=backend)
        grads.append(torch.autograd.grad(out.square().sum(), bias)[0])
    assert grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-12, rtol=1e-10)


def test_a_backend_without_a_feature_is_refused_naming_it():
    """Every feature a fused kernel lacks (``_FEATURES``) routes a call away with its name."""
    from mmfuse.ops.attention import _FEATURE_NAMES, _FEATURES, _unsupported

    q, _, _ = qkv(2, 5, 7, 2, 2, 64, dtype=torch.float16)
    for backend, has in _FEATURES.items():
        for feature in set(_FEATURE_NAMES) - has:
            assert _FEATURE_NAMES[feature] in _unsupported(q, 2, {feature})(backend)
        for feature in has:
            reason = _unsupported(q, 2, {feature})(backend)
            assert reason is None or _FEATURE_NAMES[feature] not in reason


@pytest.mark.parametrize("batch, heads_kv, threads", [(3, 2, 2), (5, 4, 1)], ids=["two-pass", "one-pass"])
def test_cpu_backward_both_schedules_with_mask_and_dropout(batch, heads_kv, threads):
    """The C++ backward's one-pass (>= 4 (sample, kv head) pairs per thread) and two-pass
    schedules both regenerate the dropout mask and read the attention mask: against float64."""
    len_q, len_k, heads_q, dim = 71, 293, 8, 40  # 293 keys: two key blocks
    q, k, v = qkv(batch, len_q, len_k, heads_q, heads_kv, dim)
    mask = torch.randn(batch, 1, len_q, len_k).masked_fill(torch.rand(batch, 1, len_q, len_k) < 0.3, NEG_INF)
    kv_lens = torch.randint(1, len_k + 1, (batch,))
    philox = torch.tensor(PHILOX)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        args = [t.detach().requires_grad_() for t in (q, k, v)]
        out, _ = torch.ops.mmfuse.cross_attention_fwd(*args, kv_lens, None, 0.2, True, mask, 0.3, philox)
        grad = torch.randn_like(out)
        out.backward(grad)
    finally:
        torch.set_num_threads(previous)
    args64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64, _ = reference64(*args64, scale=0.2, causal=True, kv_lens=kv_lens, attn_mask=mask, p=0.3, philox=philox)
    out64.backward(grad.double())
    torch.testing.assert_close(out.double(), out64, atol=2e-5, rtol=1e-4)
    for a, b in zip(args, args64):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=5e-5, rtol=3e-4)


def test_layer_with_dropout_compiles_fullgraph_on_the_cpu_kernel():
    import mmfuse.nn

    torch._dynamo.reset()
    layer = mmfuse.nn.CrossModalAttention(40, 4, dropout=0.2, kdim=24, vdim=24, backend="cpu").train()
    query, memory = torch.randn(3, 7, 40), torch.randn(3, 13, 24)
    mask = torch.rand(7, 13) < 0.3

    def step(query, memory):
        return layer(query, memory, memory, attn_mask=mask, need_weights=False)[0]

    out = torch.compile(step, fullgraph=True)(query, memory)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(layer.in_proj_bias.grad).all()
    layer.eval()
    torch.testing.assert_close(torch.compile(step, fullgraph=True)(query, memory), step(query, memory))
