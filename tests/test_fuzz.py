"""Property-based fuzzing of every public function: valid and invalid inputs, hostile layouts and values.

Each drawn case is either valid — then the C++ backend must return the reference's answer (NaN
exactly where the reference has NaN) — or carries one defect chosen by the draw — then every
backend must raise ``ValueError``, ``TypeError`` or ``RuntimeError`` whose message names the
defective argument. Layouts: contiguous, transposed (non-contiguous), stepped (every other row
of a larger tensor), expanded (stride 0), zero and odd sizes. Values: NaN, inf and huge numbers
where the rule says what must happen to them (``DESIGN.md``, "Bad input").

The case budget is ``MMFUSE_FUZZ_EXAMPLES`` per property (default 40, what CI runs with a fixed
seed: ``derandomize``); ``make fuzz`` runs 1000 with random seeds. The registered ops called
directly are fuzzed by ``tests/fuzz_raw_ops.py`` in child processes (``test_raw_ops_fuzz``), so
a crash fails one test instead of the run.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmfuse

EXAMPLES = int(os.environ.get("MMFUSE_FUZZ_EXAMPLES", "40"))
RANDOM = os.environ.get("MMFUSE_FUZZ_RANDOM", "0") == "1"
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
                suppress_health_check=list(HealthCheck))
ERRORS = (ValueError, TypeError, RuntimeError)
LAYOUTS = ("contiguous", "transposed", "stepped", "expanded")


def layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """``t``'s values in another memory layout (same shape, same values)."""
    if how == "transposed" and t.dim() >= 2:
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if how == "stepped" and t.dim() >= 1:
        big = torch.empty((t.shape[0] * 2,) + t.shape[1:], dtype=t.dtype).fill_(float("nan") if t.is_floating_point() else 0)
        big[::2] = t
        return big[::2]
    if how == "expanded" and t.dim() >= 1 and t.shape[0] >= 1 and (t == t[:1]).all():
        return t[:1].expand_as(t)
    return t


def check_backends(fn, *args, defect, rtol, atol, **kw):
    """``fn(*args, **kw)`` on the C++ backend against the reference (see :func:`check_outcome`)."""
    check_outcome(lambda: fn(*args, backend="cpu", **kw), lambda: fn(*args, backend="reference", **kw),
                  defect, rtol=rtol, atol=atol)


def check_outcome(call, reference, defect, *, rtol, atol):
    """``call()`` against ``reference()``: both raise naming ``defect``, or both agree."""
    if defect is not None:
        for fn in (call, reference):
            with pytest.raises(ERRORS) as info:
                fn()
            assert defect in str(info.value), f"the error does not name {defect!r}: {info.value}"
        return
    got, want = call(), reference()
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    assert len(got) == len(want), (len(got), len(want))
    for g, w in zip(got, want):
        if isinstance(g, torch.Tensor):
            assert_matches(g, w, rtol=rtol, atol=atol)


def assert_matches(got, want, *, rtol, atol):
    """Close where the reference is finite; non-finite exactly where it is not (NaN and inf may
    differ there: PyTorch's own vectorised and scalar activations disagree on gelu(inf))."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    if not got.is_floating_point() and not got.is_complex():
        assert torch.equal(got, want)
        return
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), "non-finite values where the reference has none, or the reverse"
    torch.testing.assert_close(got[finite], want[finite], rtol=rtol, atol=atol)


def tensor_of(draw, shape, dtype, *, poison=False):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if poison and t.numel() > 0:
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e30]))
    return t


# ----------------------------------------------------------------------------- attention


@st.composite
def attention_case(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    batch, len_q, len_k = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 13))
    heads_kv, group, dim = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 17))
    q = tensor_of(draw, (batch, len_q, heads_kv * group, dim), dtype, poison=draw(st.booleans()))
    k = tensor_of(draw, (batch, len_k, heads_kv, dim), dtype)
    v = tensor_of(draw, (batch, len_k, heads_kv, draw(st.sampled_from([dim, dim, 1 + dim % 5]))), dtype)
    kw = dict(causal=draw(st.booleans()), softcap=draw(st.sampled_from([0.0, 0.0, 2.5])))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if draw(st.booleans()):
        kw["sinks"] = torch.randn(heads_kv * group, generator=gen, dtype=dtype)
    if draw(st.booleans()):  # per-query key windows, per head or shared
        shape = (batch, heads_kv * group, len_q, 2) if draw(st.booleans()) else (batch, len_q, 2)
        kw["key_ranges"] = torch.randint(0, len_k + 1, shape, generator=gen).sort(-1).values.int()
    hidden = torch.zeros(batch, len_k, dtype=torch.bool)
    if draw(st.booleans()):
        kv_lens = torch.randint(0, len_k + 1, (batch,), generator=gen)
        kw["kv_lens"] = kv_lens
        hidden |= torch.arange(len_k)[None] >= kv_lens[:, None]
    if draw(st.booleans()):
        kpm = torch.rand(batch, len_k, generator=gen) < 0.3
        kw["key_padding_mask"] = kpm
        hidden |= kpm
    if draw(st.booleans()):
        mask = torch.rand(len_q, len_k, generator=gen) < 0.3
        kw["attn_mask"] = mask if draw(st.booleans()) else torch.zeros(len_q, len_k, dtype=dtype).masked_fill(mask, -math.inf)
        hidden |= mask.all(0)[None]
    # whatever hidden keys hold, nothing changes
    poison = draw(st.sampled_from([math.nan, math.inf, 1e30]))
    k[hidden], v[hidden] = poison, -poison
    how = draw(st.sampled_from(LAYOUTS))
    q, k, v = layout(q, how), layout(k, how), layout(v, how)
    defect = draw(st.sampled_from([None, None, None, "q", "k", "v", "kv_lens", "key_padding_mask", "attn_mask", "scale",
                                   "softcap", "sinks", "key_ranges"]))
    if defect == "q":
        q = draw(st.sampled_from([q.int(), q[0], q[..., :0], q.to("meta")]))
    elif defect == "k":
        k = draw(st.sampled_from([k.unsqueeze(0), k[..., :0], k.to(torch.float16)]))
    elif defect == "v":
        v = v[:, :1].expand(batch, len_k + 1, heads_kv, v.shape[-1])
    elif defect == "key_ranges":
        kw["key_ranges"] = draw(st.sampled_from([torch.full((batch, len_q, 2), len_k + 1, dtype=torch.int32),
                                                 torch.zeros(batch, len_q, 2), torch.zeros(batch, len_q + 1, 2,
                                                                                           dtype=torch.int32)]))
    elif defect == "softcap":
        kw["softcap"] = draw(st.sampled_from([-1.0, math.nan, math.inf, "2"]))
    elif defect == "sinks":
        kw["sinks"] = draw(st.sampled_from([torch.zeros(heads_kv * group + 1), torch.zeros(heads_kv * group, dtype=torch.int32),
                                            torch.zeros(1, heads_kv * group)]))
    elif defect == "kv_lens":
        kw["kv_lens"] = draw(st.sampled_from([torch.full((batch,), len_k + 1), torch.full((batch,), -1),
                                              torch.full((batch + 1,), 1), torch.ones(batch), [1] * batch,
                                              torch.full((batch,), 2**32 + 1)]))
    elif defect == "key_padding_mask":
        kw["key_padding_mask"] = draw(st.sampled_from([torch.zeros(batch, len_k + 1, dtype=torch.bool),
                                                       torch.zeros(batch, len_k), torch.zeros(len_k, dtype=torch.bool)]))
    elif defect == "attn_mask":
        kw["attn_mask"] = draw(st.sampled_from([torch.zeros(len_q + 1, len_k, dtype=torch.bool),
                                                torch.zeros(len_q, len_k, dtype=torch.int32),
                                                torch.zeros(len_k, dtype=torch.bool)]))
    elif defect == "scale":
        kw["scale"] = draw(st.sampled_from([0.0, -1.0, math.inf, math.nan, "1"]))
    return q, k, v, kw, defect


@FUZZ
@given(case=attention_case())
def test_fuzz_cross_attention(case):
    q, k, v, kw, defect = case
    tol = 1e-10 if q.dtype == torch.float64 else 2e-5
    check_backends(mmfuse.cross_attention, q, k, v, return_lse=True, defect=defect, rtol=tol, atol=tol, **kw)
    # and the gradients, 0 for hidden keys whatever they hold (an infinite or 1e30 query makes the
    # backward's cancellations, dP - delta, meaningless: such cases check the forward only)
    if defect is None and bool((q.abs() < 1e6).all()):

        def grads(backend):
            leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
            out = mmfuse.cross_attention(*leaves, backend=backend, **kw)
            out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape))
            return [t.grad for t in leaves]

        check_outcome(lambda: grads("cpu"), lambda: grads("reference"), None, rtol=10 * tol, atol=10 * tol)


@st.composite
def varlen_case(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    batch = draw(st.integers(0, 4))
    lens_q = [draw(st.integers(0, 9)) for _ in range(batch)]
    lens_k = [draw(st.integers(0, 11)) for _ in range(batch)]
    heads_kv, group, dim = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 13))
    q = tensor_of(draw, (sum(lens_q), heads_kv * group, dim), dtype)
    k = tensor_of(draw, (sum(lens_k), heads_kv, dim), dtype)
    v = tensor_of(draw, (sum(lens_k), heads_kv, draw(st.sampled_from([dim, 1 + dim % 4]))), dtype)
    kw = dict(softcap=draw(st.sampled_from([0.0, 0.0, 3.0])))
    if draw(st.booleans()):
        width = max(lens_k, default=0) + draw(st.integers(0, 2))
        mask = torch.rand(draw(st.sampled_from([1, heads_kv * group])), sum(lens_q), width) < 0.3
        kw["attn_mask"] = mask if draw(st.booleans()) else torch.zeros(mask.shape, dtype=dtype).masked_fill(mask, -math.inf)
    if draw(st.booleans()):
        kw["sinks"] = torch.randn(heads_kv * group, dtype=dtype)
    cu_q = torch.tensor([0] + lens_q, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + lens_k, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    max_q = max(lens_q, default=0) + draw(st.sampled_from([0, 0, 1, 2**40]))
    max_k = max(lens_k, default=0) + draw(st.sampled_from([0, 0, 3]))
    causal = draw(st.booleans())
    defect = draw(st.sampled_from([None, None, "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"]))
    if defect == "cu_seqlens_q":
        cu_q = draw(st.sampled_from([cu_q.long(), cu_q.flip(0) + 1, cu_q[:0], torch.cat([cu_q, cu_q[-1:] + 1])]))
    elif defect == "cu_seqlens_k":
        cu_k = draw(st.sampled_from([cu_k.float(), cu_k + 1, cu_k[None]]))
    elif defect == "max_seqlen_q" and max(lens_q, default=0) > 0:
        max_q = max(lens_q) - 1
    elif defect == "max_seqlen_k":
        max_k = draw(st.sampled_from([-1, 2**63, 1.5]))
    else:
        defect = None if defect == "max_seqlen_q" else defect
    return q, k, v, cu_q, cu_k, max_q, max_k, causal, kw, defect


@FUZZ
@given(case=varlen_case())
def test_fuzz_cross_attention_varlen(case):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, kw, defect = case
    tol = 1e-10 if q.dtype == torch.float64 else 2e-5

    check_backends(mmfuse.cross_attention_varlen, q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, return_lse=True,
                   defect=defect, rtol=tol, atol=tol, **kw)


# ----------------------------------------------------------------------------- packing


@st.composite
def pack_case(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    batch, modalities, dim = draw(st.integers(0, 4)), draw(st.integers(1, 3)), draw(st.integers(0, 9))
    sizes = [draw(st.integers(0, 7)) for _ in range(modalities)]
    how = draw(st.sampled_from(LAYOUTS))
    features = [layout(tensor_of(draw, (batch, n, dim), dtype, poison=draw(st.booleans())), how) for n in sizes]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    lengths = [torch.randint(0, n + 1, (batch,), generator=gen) for n in sizes] if draw(st.booleans()) else None
    padded = draw(st.booleans())
    type_embedding = tensor_of(draw, (modalities, dim), dtype) if draw(st.booleans()) else None
    kw = dict(padded=padded, type_embedding=type_embedding)
    defect = draw(st.sampled_from([None, None, "lengths", "features", "type_embedding", "padded", "max_seqlen", "total"]))
    if defect == "lengths" and batch > 0:
        m = draw(st.integers(0, modalities - 1))
        bad = draw(st.sampled_from([sizes[m] + 1, -1, 2**32 + 1, 2**31]))
        lengths = [torch.zeros(batch, dtype=torch.long) for _ in sizes] if lengths is None else lengths
        lengths[m] = lengths[m].clone()
        lengths[m][batch - 1] = bad
    elif defect == "features" and modalities > 1:
        features[1] = draw(st.sampled_from([features[1][..., :0].float() if dim else features[1].int(),
                                            features[1].to(torch.float16), features[1][:, :, None]]))
        defect = "features[1]"
    elif defect == "type_embedding":
        kw["type_embedding"] = torch.zeros(modalities + 1, dim, dtype=dtype)
    elif defect == "padded":
        kw["padded"] = "yes"
    elif defect == "max_seqlen" and padded and sum(sizes) > 0 and batch > 0:
        lengths = [torch.full((batch,), n) for n in sizes]
        kw["max_seqlen"] = sum(sizes) - 1
    elif defect == "total" and not padded:
        lengths = [torch.full((batch,), n) for n in sizes]
        kw["total"] = batch * sum(sizes) + 1
    else:
        defect = None
    return features, lengths, kw, defect


@FUZZ
@given(case=pack_case())
def test_fuzz_pack_and_unpack(case):
    features, lengths, kw, defect = case

    def run(backend):
        return lambda: tuple(mmfuse.pack_modalities(features, lengths, backend=backend, **kw))[:3]

    check_outcome(run("cpu"), run("reference"), defect, rtol=0, atol=0)
    if defect is None:
        packed = mmfuse.pack_modalities(features, lengths, backend="cpu", **kw)
        lens = lengths or [torch.full((f.shape[0],), f.shape[1]) for f in features]
        sizes = [f.shape[1] for f in features]
        for backend in ("cpu", "reference"):
            got = mmfuse.unpack_modalities(packed.tokens, lens, sizes, backend=backend)
            for m, (f, g, n) in enumerate(zip(features, got, lens)):
                keep = torch.arange(f.shape[1])[None, :] < n[:, None]
                emb = 0 if kw["type_embedding"] is None else kw["type_embedding"][m]
                want = torch.where(keep[..., None], f + emb, torch.zeros((), dtype=f.dtype))
                torch.testing.assert_close(g, want, rtol=0, atol=0, equal_nan=True)


# ----------------------------------------------------------------------------- fusion


@st.composite
def fusion_case(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    rows, inputs = draw(st.integers(0, 6)), draw(st.integers(1, 3))
    widths = [draw(st.integers(0, 7)) for _ in range(inputs)]
    out = draw(st.integers(1, 6))
    how = draw(st.sampled_from(LAYOUTS))
    xs = [layout(tensor_of(draw, (rows, w), dtype, poison=draw(st.booleans())), how) for w in widths]
    weight = tensor_of(draw, (out, sum(widths)), dtype)
    bias = tensor_of(draw, (out,), dtype) if draw(st.booleans()) else None
    activation = draw(st.sampled_from([None, "relu", "gelu", "silu", "tanh", "sigmoid"]))
    defect = draw(st.sampled_from([None, None, "weight", "bias", "activation", "xs[0]"]))
    if defect == "weight":
        weight = draw(st.sampled_from([weight[:, :-1] if sum(widths) else weight[:, :0].repeat(1, 2) + 1,
                                       weight.to(torch.float16), weight[None]]))
        if weight.dim() == 2 and weight.dtype == dtype and weight.shape[1] == sum(widths):
            weight = weight[None]
    elif defect == "bias":
        bias = torch.zeros(out + 1, dtype=dtype)
    elif defect == "activation":
        activation = "swish"
    elif defect == "xs[0]":
        xs[0] = xs[0].int()
    return xs, weight, bias, activation, defect


@FUZZ
@given(case=fusion_case())
def test_fuzz_fused_concat_linear(case):
    xs, weight, bias, activation, defect = case
    tol = 1e-12 if weight.dtype == torch.float64 else 1e-5
    check_backends(mmfuse.fused_concat_linear, xs, weight, bias, activation, defect=defect, rtol=tol, atol=tol)


@st.composite
def combine_case(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=1, max_size=3)))
    modalities = draw(st.integers(1, 4))
    mode = draw(st.sampled_from(["sum", "product", "gated"]))
    how = draw(st.sampled_from(LAYOUTS))
    projected = [layout(tensor_of(draw, shape, dtype, poison=draw(st.booleans())), how) for _ in range(modalities)]
    kw = dict(activation=draw(st.sampled_from([None, "relu", "gelu", "silu", "tanh", "sigmoid"])))
    if mode == "sum":
        kw["logits"] = tensor_of(draw, (modalities,), dtype)
    if mode == "gated":
        kw["gate_logits"] = [tensor_of(draw, shape, dtype) for _ in range(modalities)]
    defect = draw(st.sampled_from([None, None, "mode", "logits", "gate_logits"]))
    if defect == "mode":
        mode = "max"
    elif defect == "logits":
        kw["logits"] = torch.zeros(modalities + 1, dtype=dtype)
        kw.pop("gate_logits", None)
        mode = "sum"
    elif defect == "gate_logits":
        kw.pop("logits", None)
        kw["gate_logits"] = [torch.zeros(shape + (2,), dtype=dtype) for _ in range(modalities)]
        mode = "gated"
    return projected, mode, kw, defect


@FUZZ
@given(case=combine_case())
def test_fuzz_combine_modalities(case):
    projected, mode, kw, defect = case
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[projected[0].dtype]
    check_backends(mmfuse.combine_modalities, projected, mode, defect=defect, rtol=tol, atol=tol, **kw)


# ----------------------------------------------------------------------------- spectrograms


@st.composite
def spectrogram_case(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    n_fft = draw(st.sampled_from([16, 25, 64, 100]))
    hop = draw(st.integers(1, n_fft))
    batch, samples = draw(st.integers(1, 3)), draw(st.integers(n_fft, 4 * n_fft))
    wave = tensor_of(draw, (batch, samples), dtype)
    if draw(st.booleans()):  # silence: all-zero frames
        wave[:, : samples // 2] = 0
    center = draw(st.booleans())
    pad_mode = draw(st.sampled_from(["reflect", "constant", "replicate"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    low = n_fft // 2 + 1 if center and pad_mode == "reflect" else (1 if center else 0)
    lengths = torch.randint(low, samples + 1, (batch,), generator=gen) if draw(st.booleans()) else None
    kw = dict(n_fft=n_fft, hop_length=hop, center=center, pad_mode=pad_mode, lengths=lengths,
              power=draw(st.sampled_from([1.0, 2.0, 0.5])))
    fn = draw(st.sampled_from(["spectrogram", "mel_spectrogram"]))
    if fn == "mel_spectrogram":
        kw.update(n_mels=draw(st.integers(2, 12)), sample_rate=8000, f_max=3900.0)
    defect = draw(st.sampled_from([None, None, "lengths", "power", "hop_length", "waveform"]))
    if defect == "lengths":
        kw["lengths"] = draw(st.sampled_from([torch.full((batch,), samples + 1), torch.full((batch,), -1),
                                              torch.ones(batch), torch.full((batch,), 2**33)]))
    elif defect == "power":
        kw["power"] = draw(st.sampled_from([math.inf, math.nan, 0.0, -2.0]))
    elif defect == "hop_length":
        kw["hop_length"] = draw(st.sampled_from([0, -3, 2.5]))
    elif defect == "waveform":
        wave = draw(st.sampled_from([wave.int(), wave[:, :0], wave.to(torch.float16)]))
        kw["lengths"] = None
    if defect is None and kw["lengths"] is not None and center and pad_mode == "reflect" and draw(st.booleans()):
        kw["lengths"][0] = n_fft // 2  # one item too short to reflect: refused naming lengths
        defect = "lengths"
    return fn, wave, kw, defect


@FUZZ
@given(case=spectrogram_case())
def test_fuzz_spectrograms(case):
    fn, wave, kw, defect = case
    fn = getattr(mmfuse, fn)
    tol = 1e-9 if wave.dtype == torch.float64 else 2e-3
    # |X| ** p for p < 1 magnifies the DFT's rounding near |X| = 0 (d/dx x^p is unbounded there):
    # an error e in |X|² becomes e ** (p / 2) in the output
    atol = tol ** (kw["power"] / 2) if isinstance(kw["power"], float) and 0 < kw["power"] < 2 else tol
    check_backends(fn, wave, defect=defect, rtol=tol, atol=atol, **kw)


@st.composite
def front_end_case(draw):
    """mfcc, whisper_log_mel, kaldi_fbank and amplitude_to_db: presets whose few free arguments
    are drawn, with silent stretches and per-item lengths."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    fn = draw(st.sampled_from(["mfcc", "whisper_log_mel", "kaldi_fbank", "amplitude_to_db"]))
    batch = draw(st.integers(1, 3))
    samples = draw(st.integers(401, 1700))
    wave = tensor_of(draw, (batch, samples), dtype)
    if draw(st.booleans()):
        wave[:, : samples // 3] = 0
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    lengths = torch.randint(401, samples + 1, (batch,), generator=gen) if draw(st.booleans()) else None
    kw = dict(lengths=lengths)
    if fn == "mfcc":
        kw.update(sample_rate=8000, n_mfcc=draw(st.integers(2, 13)), log_mels=draw(st.booleans()),
                  melkwargs=dict(n_fft=draw(st.sampled_from([64, 100])), n_mels=20, f_max=3900.0))
    elif fn == "whisper_log_mel":
        kw.update(n_mels=draw(st.sampled_from([80, 128])))
    elif fn == "kaldi_fbank":
        kw.update(num_mel_bins=draw(st.integers(5, 23)), snip_edges=draw(st.booleans()),
                  use_energy=draw(st.booleans()), sample_frequency=8000.0)
    else:
        kw = dict(stype=draw(st.sampled_from(["power", "magnitude"])), top_db=draw(st.sampled_from([None, 80.0])))
        wave = wave.abs()
    defect = draw(st.sampled_from([None, None, "lengths", "waveform"]))
    if fn == "amplitude_to_db" and defect is not None:
        defect, kw["top_db"] = "top_db", draw(st.sampled_from([-1.0, math.inf, math.nan]))
    elif defect == "lengths":
        kw["lengths"] = draw(st.sampled_from([torch.full((batch,), samples + 1), torch.full((batch,), -1),
                                              torch.ones(batch)]))
    elif defect == "waveform":
        wave = wave.int()
        defect = "audio" if fn == "whisper_log_mel" else "waveform"
    return fn, wave, kw, defect


@FUZZ
@given(case=front_end_case())
def test_fuzz_front_ends(case):
    fn, wave, kw, defect = case
    tol = 1e-8 if wave.dtype == torch.float64 else 2e-3
    if fn == "amplitude_to_db":  # no backend argument: one implementation, checked against its formula
        call = lambda: mmfuse.amplitude_to_db(wave, **kw)  # noqa: E731
        scale = 10.0 if kw.get("stype") == "power" else 20.0

        def reference():
            x = scale * torch.log10(wave.clamp_min(1e-10))
            if kw.get("top_db") is not None:
                x = torch.maximum(x, x.amax(dim=(-2, -1), keepdim=True) - kw["top_db"])
            return x

        check_outcome(call, call if defect else reference, defect, rtol=tol, atol=tol)
        return
    f = getattr(mmfuse, fn)
    check_backends(f, wave, defect=defect, rtol=tol, atol=50 * tol, **kw)


# ----------------------------------------------------------------------------- registered ops, in child processes

RAW_CASES = int(os.environ.get("MMFUSE_FUZZ_RAW_CASES", "1200"))
RAW_BATCH = 300


@pytest.mark.parametrize("first", range(0, RAW_CASES, RAW_BATCH))
def test_raw_ops_fuzz(first):
    """The registered ops called directly with mutated arguments, a child process per batch of
    cases: each must raise a RuntimeError naming its op, or return; a crash fails this batch and
    names the case it died in (the child prints each case before running it)."""
    seed = int(os.environ.get("MMFUSE_FUZZ_SEED", "0"))
    script = Path(__file__).with_name("fuzz_raw_ops.py")
    run = subprocess.run([sys.executable, str(script), str(seed), str(first), str(min(first + RAW_BATCH, RAW_CASES))],
                         capture_output=True, text=True, timeout=600)
    last = run.stdout.strip().splitlines()[-1:] or ["(none)"]
    assert run.returncode == 0, f"child died (rc {run.returncode}) in case {last[0]}\n{run.stderr[-3000:]}"
    assert run.stdout.strip().endswith("done"), run.stdout[-2000:]
