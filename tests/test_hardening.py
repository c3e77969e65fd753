"""Regression tests for the hardening issue: each defect a randomized campaign found in what ships.

Memory safety of the registered ops called directly, work sized from real lengths, the NaN/inf
rule for attention (a hidden key never influences anything; NaN in what is visible propagates),
checks before narrowing, the reference refusing what the kernels refuse, checks that hold under
``torch.compile``, and errors that name the argument.
"""
import math
import subprocess
import sys
import textwrap

import pytest
import torch

import mmfuse
import mmfuse.nn
from backend_params import backend_params, device_for

NAN, INF = float("nan"), float("inf")
ATTENTION_BACKENDS = backend_params("cpu", "reference", "triton")


def _on(backend, *tensors):
    """The tensors on the backend's device, in its dtype (float64 on the CPU ones, float32 on Triton)."""
    dtype = torch.float64 if backend in ("cpu", "reference") else torch.float32
    moved = [t.to(device_for(backend), dtype if t.is_floating_point() else t.dtype) for t in tensors]
    return moved if len(moved) > 1 else moved[0]


def _attention_inputs(seed, batch=3, len_q=7, len_k=11, heads_q=4, heads_kv=2, dim=40, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, len_q, heads_q, dim, generator=g, dtype=dtype)
    k = torch.randn(batch, len_k, heads_kv, dim, generator=g, dtype=dtype)
    v = torch.randn(batch, len_k, heads_kv, dim, generator=g, dtype=dtype)
    return q, k, v


def _grads(backend, q, k, v, **kw):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = mmfuse.cross_attention(q, k, v, backend=backend, **kw)
    g = torch.Generator().manual_seed(123)
    out.backward(torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device))
    return out.detach(), q.grad, k.grad, v.grad


# ------------------------------------------------------------------------ registered ops, called directly


def test_attention_bwd_checks_lse_against_q():
    q = torch.randn(2, 5, 4, 8)
    k = torch.randn(2, 7, 2, 8)
    with pytest.raises(RuntimeError, match="cross_attention_bwd: lse must be .* shape \\[2, 4, 5\\]"):
        torch.ops.mmfuse.cross_attention_bwd(q, None, q, k, k, q, torch.zeros(1), None, None, 1.0, False)
    lse = torch.zeros(2, 4, 5)
    with pytest.raises(RuntimeError, match="grad_lse must be"):
        torch.ops.mmfuse.cross_attention_bwd(q, torch.zeros(3), q, k, k, q, lse, None, None, 1.0, False)
    with pytest.raises(RuntimeError, match="grad_out must be"):
        torch.ops.mmfuse.cross_attention_bwd(q[:, :2], None, q, k, k, q, lse, None, None, 1.0, False)


def test_varlen_bwd_checks_lse_against_q():
    q, k = torch.randn(5, 4, 8), torch.randn(7, 2, 8)
    cu_q, cu_k = torch.tensor([0, 2, 5], dtype=torch.int32), torch.tensor([0, 3, 7], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="cross_attention_varlen_bwd: lse must be .* shape \\[4, 5\\]"):
        torch.ops.mmfuse.cross_attention_varlen_bwd(q, None, q, k, k, q, torch.zeros(1), cu_q, cu_k, 3, 4, 1.0, False)


def test_fused_concat_linear_bwd_checks_preact_and_grad_out():
    x, w = torch.randn(200_000, 3), torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="fused_concat_linear_bwd: preact must be"):
        torch.ops.mmfuse.fused_concat_linear_bwd(torch.randn(200_000, 4), [x], w, torch.zeros(1), "relu", True)
    with pytest.raises(RuntimeError, match="fused_concat_linear_bwd: grad_out must be"):
        torch.ops.mmfuse.fused_concat_linear_bwd(torch.randn(1, 4), [x], w, torch.zeros(1), "none", True)
    with pytest.raises(RuntimeError, match="fused_concat_linear: weight must be"):
        torch.ops.mmfuse.fused_concat_linear([x[:5]], w.double(), None, "none")
    with pytest.raises(RuntimeError, match="fused_concat_linear: bias must be"):
        torch.ops.mmfuse.fused_concat_linear([x[:5]], w, torch.zeros(3), "none")


def test_varlen_work_is_sized_by_the_real_lengths():
    """max_seqlen is an upper bound: 2**62 must cost what the real lengths cost (it used to size
    the task grid and never return), in a child process so a regression fails instead of hanging."""
    code = textwrap.dedent(
        """
        import torch, mmfuse
        q, k = torch.randn(5, 4, 8, dtype=torch.float64), torch.randn(7, 2, 8, dtype=torch.float64)
        cu_q = torch.tensor([0, 3, 5], dtype=torch.int32)
        cu_k = torch.tensor([0, 4, 7], dtype=torch.int32)
        big = torch.ops.mmfuse.cross_attention_varlen_fwd(q, k, k, cu_q, cu_k, 2**62, 2**62, 0.3, False)
        exact = torch.ops.mmfuse.cross_attention_varlen_fwd(q, k, k, cu_q, cu_k, 3, 4, 0.3, False)
        assert torch.equal(big[0], exact[0]) and torch.equal(big[1], exact[1])
        api = mmfuse.cross_attention_varlen(q, k, k, cu_q, cu_k, 2**62, 6, scale=0.3, backend="cpu")
        assert torch.equal(api, exact[0])
        ref = mmfuse.cross_attention_varlen(q, k, k, cu_q, cu_k, 2**40, 2**40, scale=0.3, backend="reference")
        torch.testing.assert_close(ref, exact[0])
        print("ok")
        """
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_varlen_refuses_max_seqlen_below_the_longest_sequence():
    q, k = torch.randn(5, 4, 8), torch.randn(7, 2, 8)
    cu_q, cu_k = torch.tensor([0, 3, 5], dtype=torch.int32), torch.tensor([0, 4, 7], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="max_seqlen_q must be >= the longest query sequence, got 2 < 3"):
        torch.ops.mmfuse.cross_attention_varlen_fwd(q, k, k, cu_q, cu_k, 2, 4, 1.0, False)
    with pytest.raises(RuntimeError, match="max_seqlen_k must be >= the longest key sequence, got 3 < 4"):
        torch.ops.mmfuse.cross_attention_varlen_fwd(q, k, k, cu_q, cu_k, 3, 3, 1.0, False)
    with pytest.raises(ValueError, match="max_seqlen_k must be >= the longest sequence in cu_seqlens_k"):
        mmfuse.cross_attention_varlen(q, k, k, cu_q, cu_k, 3, 3)


# ------------------------------------------------------------------------ NaN and inf in attention


def _hiding_cases(len_q, len_k):
    """(name, kwargs, hidden key columns per sample) for each way of hiding keys from every query."""
    kpm = torch.zeros(3, len_k, dtype=torch.bool)
    kpm[0, [1, 4]] = True
    kpm[2, len_k - 1] = True
    bool_mask = torch.zeros(3, 1, len_q, len_k, dtype=torch.bool)
    bool_mask[:, :, :, 2] = True
    float_mask = torch.randn(1, 4, len_q, len_k, dtype=torch.float64)
    float_mask[..., 5] = -INF
    kv_lens = torch.tensor([len_k - 2, len_k, 3])
    return [
        ("key_padding_mask", dict(key_padding_mask=kpm), kpm),
        ("bool attn_mask", dict(attn_mask=bool_mask), bool_mask[:, 0].all(1)),
        ("float attn_mask", dict(attn_mask=float_mask), (float_mask == -INF).all(2).all(1).expand(3, len_k)),
        ("kv_lens", dict(kv_lens=kv_lens), torch.arange(len_k)[None, :] >= kv_lens[:, None]),
    ]


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("case", range(4), ids=["key_padding_mask", "bool attn_mask", "float attn_mask", "kv_lens"])
@pytest.mark.parametrize("poison", [NAN, INF, -INF])
def test_hidden_keys_never_influence_anything(backend, case, poison):
    q, k, v = _on(backend, *_attention_inputs(case))
    _, kwargs, hidden = _hiding_cases(q.shape[1], k.shape[1])[case]
    kwargs = {name: _on(backend, t) for name, t in kwargs.items()}
    hidden = hidden.to(q.device)
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[hidden] = poison
    poisoned_v[hidden] = -poison
    clean = _grads(backend, q, k, v, **kwargs)
    dirty = _grads(backend, q, poisoned_k, poisoned_v, **kwargs)
    for name, want, got in zip(("out", "dq", "dk", "dv"), clean, dirty):
        assert torch.isfinite(got).all(), f"{name}: a hidden key's {poison} leaked"
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)  # hidden rows are zeroed: exact
    # and the hidden keys' own gradients are exactly 0
    assert (dirty[2][hidden] == 0).all() and (dirty[3][hidden] == 0).all()


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_nan_in_a_query_or_a_visible_key_propagates(backend):
    q, k, v = _attention_inputs(7, dtype=torch.float32)
    q, k, v = (t.to(device_for(backend)) for t in (q, k, v))
    causal_k = 11
    q[1, 3, 2, 5] = NAN  # query row (1, 3, head 2)
    k[2, 9, 0, 1] = NAN  # key 9 of sample 2, kv head 0 (query heads 0, 1): causally seen by queries 5, 6 only
    out, lse = mmfuse.cross_attention(q, k, v, causal=True, return_lse=True, backend=backend)
    ref_out, ref_lse = mmfuse.cross_attention(q, k, v, causal=True, return_lse=True, backend="reference")
    out, lse = out.cpu(), lse.cpu()
    ref_out, ref_lse = ref_out.cpu(), ref_lse.cpu()
    nan_rows = torch.zeros(3, 7, 4, dtype=torch.bool)
    nan_rows[1, 3, 2] = True
    # causal, bottom-right: query i of sample 2 sees key 9 iff 9 <= i + 11 - 7
    for i in range(7):
        if 9 <= i + causal_k - 7:
            nan_rows[2, i, :2] = True
    assert nan_rows[2, :, 0].sum() == 2
    assert out.isnan().any(-1).eq(nan_rows).all()
    assert lse.isnan().eq(nan_rows.permute(0, 2, 1)).all()
    torch.testing.assert_close(out, ref_out, equal_nan=True, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, equal_nan=True, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_keys_hidden_by_causal_and_attn_mask_together_never_influence_anything(backend):
    """Key 3 is causally visible only to the last query, and the mask hides it from that one."""
    q, k, v = _on(backend, *_attention_inputs(11, batch=2, len_q=4, len_k=4))
    mask = torch.zeros(4, 4, dtype=torch.bool, device=q.device)
    mask[3, 3] = True
    clean = _grads(backend, q, k, v, causal=True, attn_mask=mask)
    k[:, 3], v[:, 3] = NAN, INF
    dirty = _grads(backend, q, k, v, causal=True, attn_mask=mask)
    for name, want, got in zip(("out", "dq", "dk", "dv"), clean, dirty):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_hidden_keys_get_zero_gradient_in_a_nan_row(backend):
    """A NaN query row is NaN, but the keys it cannot see still get exactly 0 gradient from it."""
    q, k, v = _on(backend, *_attention_inputs(5, batch=1, len_q=5, len_k=9))
    q[0, 2, :, 3] = NAN
    kpm = torch.zeros(1, 9, dtype=torch.bool, device=q.device)
    kpm[0, [1, 6]] = True
    out, dq, dk, dv = _grads(backend, q, k, v, key_padding_mask=kpm, causal=True)
    ref = _grads("reference", q, k, v, key_padding_mask=kpm, causal=True)
    assert out[0, 2].isnan().all() and torch.isfinite(out[0, :2]).all()
    assert (dk[0, [1, 6]] == 0).all() and (dv[0, [1, 6]] == 0).all()
    for name, want, got in zip(("out", "dq", "dk", "dv"), ref, (out, dq, dk, dv)):
        assert torch.equal(got.isnan(), want.isnan()), name
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5, equal_nan=True, msg=name)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_nan_query_with_every_key_hidden_gives_zero(backend):
    """A row with no visible key is 0 whatever the query holds (its scores are all hidden)."""
    q, k, v = _attention_inputs(3, dtype=torch.float32)
    q[0, 2] = NAN
    kpm = torch.zeros(3, 11, dtype=torch.bool)
    kpm[0] = True
    q, k, v, kpm = (t.to(device_for(backend)) for t in (q, k, v, kpm))
    out, lse = mmfuse.cross_attention(q, k, v, key_padding_mask=kpm, return_lse=True, backend=backend)
    assert (out[0] == 0).all() and (lse[0] == -INF).all()
    assert torch.isfinite(out[1:]).all()


# ------------------------------------------------------------------------ packing and narrowing


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_pack_checks_lengths_before_narrowing_to_int32(backend):
    f0, f1 = torch.randn(2, 4, 8), torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"lengths\[1\] must lie in \[0, 3\].*4294967297"):
        mmfuse.pack_modalities([f0, f1], [torch.tensor([4, 2]), torch.tensor([3, 2**32 + 1])], backend=backend)
    with pytest.raises(ValueError, match=r"lengths\[0\] must lie in \[0, 3\]"):
        mmfuse.unpack_modalities(torch.randn(4, 8), [torch.tensor([2**32 + 1, 3])], [3], backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_unpack_refuses_a_wrong_row_count(backend):
    lengths = [torch.tensor([3, 2]), torch.tensor([1, 2])]
    for rows in (7, 9):  # the packed batch has 8
        with pytest.raises((ValueError, RuntimeError), match="unpack_modalities: packed tokens must have sum"):
            mmfuse.unpack_modalities(torch.randn(rows, 5), lengths, [3, 2], backend=backend)
    with pytest.raises((ValueError, RuntimeError), match="unpack_modalities: padded tokens must"):
        mmfuse.unpack_modalities(torch.randn(2, 3, 5), lengths, [3, 2], backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_pack_refuses_a_wrong_total_or_short_max_seqlen_naming_it(backend):
    f = [torch.randn(2, 3, 4), torch.randn(2, 2, 4)]
    lengths = [torch.tensor([3, 1]), torch.tensor([2, 2])]
    with pytest.raises((ValueError, RuntimeError), match="total"):
        mmfuse.pack_modalities(f, lengths, total=7, backend=backend)
    with pytest.raises((ValueError, RuntimeError), match="max_seqlen"):
        mmfuse.pack_modalities(f, lengths, padded=True, max_seqlen=4, backend=backend)
    got = mmfuse.pack_modalities(f, lengths, total=8, backend=backend)
    assert got.tokens.shape == (8, 4)


def test_pack_padded_must_be_a_bool():
    with pytest.raises(TypeError, match="pack_modalities: padded must be a bool, got str"):
        mmfuse.pack_modalities([torch.randn(2, 3, 4)], padded="yes")


# ------------------------------------------------------------------------ fusion


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_fused_concat_linear_takes_a_zero_width_input(backend):
    x0 = torch.randn(5, 0, dtype=torch.float64, requires_grad=True)
    x1 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64)
    out = mmfuse.fused_concat_linear([x0, x1], w, b, "gelu", backend=backend)
    want = torch.nn.functional.gelu(torch.nn.functional.linear(torch.cat([x0, x1], -1), w, b))
    torch.testing.assert_close(out, want)
    out.sum().backward()
    assert x0.grad.shape == (5, 0) and torch.isfinite(w.grad).all()


# ------------------------------------------------------------------------ spectrogram


@pytest.mark.parametrize("power", [0.5, 1.0])
def test_reference_power_gradient_is_finite_on_silent_frames(power):
    wave = torch.zeros(2, 3001, dtype=torch.float64)
    wave[1, 1000:2000] = torch.randn(1000, dtype=torch.float64)
    grads = {}
    for backend in ("cpu", "reference"):
        w = wave.clone().requires_grad_(True)
        mmfuse.spectrogram(w, power=power, backend=backend).sum().backward()
        grads[backend] = w.grad
    assert torch.isfinite(grads["reference"]).all()
    torch.testing.assert_close(grads["reference"], grads["cpu"], rtol=1e-7, atol=1e-9)


def test_reflect_padding_length_check_holds_under_compile():
    wave = torch.randn(2, 1600)
    lengths = torch.tensor([1600, 3])
    with pytest.raises(ValueError, match="lengths: pad_mode='reflect'"):
        mmfuse.mel_spectrogram(wave, n_fft=400, lengths=lengths, backend="cpu")
    compiled = torch.compile(mmfuse.nn.MelSpectrogram(n_fft=400, n_mels=40, backend="cpu"), fullgraph=True)
    with pytest.raises(Exception, match=r"lengths\[1\]: pad_mode reflect .* needs at least 201 samples"):
        compiled(wave, lengths)
    # and the direct op call
    with pytest.raises(RuntimeError, match=r"lengths\[1\]: pad_mode reflect"):
        window, fb = torch.hann_window(400), torch.zeros(201, 8)
        torch.ops.mmfuse.mel_spectrogram(wave, window, fb, lengths, torch.tensor([5, 0]), 5, 400, 200, -200, 0, 1,
                                         False, 0.0, 2.0, 0, 0.0, 0, 0.0, False, False)


# ------------------------------------------------------------------------ errors that name the argument


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: mmfuse.cross_attention(*_attention_inputs(0)[:3], kv_lens=[3, 7, 2]), TypeError,
         "cross_attention: kv_lens must be a torch.Tensor or None, got list"),
        (lambda: mmfuse.cross_attention(*_attention_inputs(0)[:3], scale=INF), ValueError,
         "cross_attention: scale must be a finite number > 0, got inf"),
        (lambda: mmfuse.cross_attention_varlen(torch.randn(5, 4, 8), torch.randn(7, 2, 8), torch.randn(7, 2, 8),
                                               torch.tensor([0, 5], dtype=torch.int32),
                                               torch.tensor([0, 7], dtype=torch.int32), 2**63, 7),
         ValueError, "max_seqlen_q must lie in"),
        (lambda: mmfuse.mel_spectrogram(torch.randn(1000), sample_rate=INF), ValueError,
         "mel_spectrogram: sample_rate must be a finite number > 0, got inf"),
        (lambda: mmfuse.mel_spectrogram(torch.randn(1000), f_max=INF), ValueError,
         "mel_spectrogram: f_max must be a finite number > 0, got inf"),
        (lambda: mmfuse.mel_spectrogram(torch.randn(1000), power=INF), ValueError,
         "mel_spectrogram: power must be a finite number > 0, got inf"),
        (lambda: mmfuse.spectrogram(torch.randn(1000), power=NAN), ValueError, "spectrogram: power must be"),
    ],
    ids=["kv_lens list", "scale inf", "max_seqlen 2**63", "sample_rate inf", "f_max inf", "power inf", "power nan"],
)
def test_errors_name_the_argument(call, error, message):
    with pytest.raises(error, match=message.replace("*", r"\*")):
        call()
