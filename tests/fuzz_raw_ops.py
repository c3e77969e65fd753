"""Fuzz the registered ops (``torch.ops.mmfuse.*``) called directly, as compiled graphs and users do.

Run as ``python tests/fuzz_raw_ops.py SEED FIRST END``: cases FIRST..END-1 of the stream seeded
by SEED. Each case builds a valid argument list for one op, applies one to three random
mutations (a tensor reshaped, narrowed, widened, made non-contiguous or of another dtype, an
int pushed out of range, a value made NaN/inf), prints ``case N op mutations`` and calls the op.
The call must either raise ``RuntimeError`` (or ``ValueError``/``TypeError`` from the schema
binding) or return; anything else — a segfault, an abort, an ASan report — kills this process,
and the parent test (``tests/test_fuzz.py::test_raw_ops_fuzz``) fails naming the last case
printed. Under ``make cpu-sanitize`` the same cases run on the ASan/UBSan build, so an
out-of-bounds read that returns garbage fails too.
"""
from __future__ import annotations

import random
import sys

import torch

import mmfuse  # noqa: F401  (loads the ops)

OPS = torch.ops.mmfuse


def attention_args(r: random.Random):
    b, lq, lk, hkv, g, d = r.randint(1, 3), r.randint(1, 9), r.randint(1, 11), r.randint(1, 2), r.randint(1, 2), r.randint(1, 12)
    dv = d if r.random() < 0.7 else r.randint(1, 12)
    q, k, v = torch.randn(b, lq, hkv * g, d), torch.randn(b, lk, hkv, d), torch.randn(b, lk, hkv, dv)
    kv_lens = torch.randint(0, lk + 1, (b,)) if r.random() < 0.5 else None
    kpm = torch.rand(b, lk) < 0.3 if r.random() < 0.5 else None
    mask = r.choice([torch.rand(lq, lk) < 0.3, torch.randn(b, hkv * g, lq, lk), torch.randn(1, 1, lq, lk)]) \
        if r.random() < 0.3 else None
    p = 0.25 if r.random() < 0.3 else 0.0
    philox = torch.tensor([r.randint(0, 2**40), r.randint(0, 2**20)]) if p else None
    softcap = 2.0 if r.random() < 0.3 else 0.0
    sinks = torch.randn(hkv * g) if r.random() < 0.3 else None
    ranges = None
    if r.random() < 0.3:
        ends = torch.randint(0, lk + 1, (b, lq, 2)).sort(-1).values
        ranges = ends.int()
    fwd = [q, k, v, kv_lens, kpm, 0.3, r.random() < 0.5, mask, p, philox, softcap, sinks, ranges]
    if r.random() < 0.5:
        return "cross_attention_fwd", fwd
    out, lse = OPS.cross_attention_fwd(*fwd)
    grad_lse = torch.randn_like(lse) if r.random() < 0.3 else None
    mask_grad = mask is not None and r.random() < 0.5
    return "cross_attention_bwd", [torch.randn_like(out), grad_lse, q, k, v, out, lse, *fwd[3:], mask_grad]


def varlen_args(r: random.Random):
    b = r.randint(0, 3)
    lq, lk = [r.randint(0, 6) for _ in range(b)], [r.randint(0, 8) for _ in range(b)]
    hkv, g, d = r.randint(1, 2), r.randint(1, 2), r.randint(1, 9)
    dv = d if r.random() < 0.7 else r.randint(1, 9)
    q, k, v = torch.randn(sum(lq), hkv * g, d), torch.randn(sum(lk), hkv, d), torch.randn(sum(lk), hkv, dv)
    cu_q = torch.tensor([0] + lq).cumsum(0).int()
    cu_k = torch.tensor([0] + lk).cumsum(0).int()
    width = max(lk, default=0) + r.randint(0, 2)
    mask = r.choice([torch.rand(sum(lq), width) < 0.3, torch.randn(hkv * g, sum(lq), width),
                     torch.randn(1, sum(lq), width)]) if r.random() < 0.3 else None
    p = 0.25 if r.random() < 0.3 else 0.0
    philox = torch.tensor([r.randint(0, 2**40), r.randint(0, 2**20)]) if p else None
    softcap = 2.0 if r.random() < 0.3 else 0.0
    sinks = torch.randn(hkv * g) if r.random() < 0.3 else None
    ranges = None
    if r.random() < 0.3:  # each row within its own sequence's keys
        row_k = torch.tensor(lk, dtype=torch.long).repeat_interleave(torch.tensor(lq, dtype=torch.long)) if b else \
            torch.zeros(0, dtype=torch.long)
        ranges = (torch.rand(sum(lq), 2) * (row_k[:, None] + 1)).long().clamp(max=row_k[:, None]).sort(-1).values.int()
    fwd = [q, k, v, cu_q, cu_k, max(lq, default=0), max(lk, default=0), 0.5, r.random() < 0.5, mask, p, philox,
           softcap, sinks, ranges]
    if r.random() < 0.5:
        return "cross_attention_varlen_fwd", fwd
    out, lse = OPS.cross_attention_varlen_fwd(*fwd)
    mask_grad = mask is not None and r.random() < 0.5
    return "cross_attention_varlen_bwd", [torch.randn_like(out), None, q, k, v, out, lse, *fwd[3:], mask_grad]


def pack_args(r: random.Random):
    b, m, d = r.randint(0, 3), r.randint(1, 3), r.randint(1, 6)
    sizes = [r.randint(0, 5) for _ in range(m)]
    feats = [torch.randn(b, n, d) for n in sizes]
    lengths = torch.stack([torch.randint(0, n + 1, (b,)) for n in sizes]).int() if b else torch.zeros(m, 0, dtype=torch.int32)
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.sum(0).cumsum(0).int()])
    emb = torch.randn(m, d) if r.random() < 0.5 else None
    padded = r.random() < 0.5
    if r.random() < 0.5:
        return "pack_modalities", [feats, lengths, cu, emb, padded, None]
    tokens, _ = OPS.pack_modalities(feats, lengths, cu, None, padded, None)
    return "unpack_modalities", [tokens, lengths, cu, sizes]


def fusion_args(r: random.Random):
    n, widths, out = r.randint(0, 7), [r.randint(0, 5) for _ in range(r.randint(1, 3))], r.randint(1, 5)
    xs = [torch.randn(n, w) for w in widths]
    w = torch.randn(out, sum(widths))
    bias = torch.randn(out) if r.random() < 0.5 else None
    act = r.choice(["none", "relu", "gelu", "silu", "tanh", "sigmoid"])
    if r.random() < 0.5:
        return "fused_concat_linear", [xs, w, bias, act]
    _, preact = OPS.fused_concat_linear(xs, w, bias, act)
    return "fused_concat_linear_bwd", [torch.randn(n, out), xs, w, preact, act, bias is not None]


def combine_args(r: random.Random):
    shape, m = [r.randint(1, 5) for _ in range(r.randint(1, 3))], r.randint(1, 4)
    proj = [torch.randn(shape) for _ in range(m)]
    mode = r.choice(["sum", "product", "gated"])
    weights = torch.randn(m) if mode == "sum" else None
    gates = [torch.randn(shape) for _ in range(m)] if mode == "gated" else []
    act = r.choice(["none", "relu", "silu"])
    if r.random() < 0.5:
        return "combine_modalities", [proj, mode, weights, gates, act]
    return "combine_modalities_bwd", [torch.randn(shape), proj, mode, weights, gates, act]


def mel_args(r: random.Random):
    n_fft = r.choice([8, 16, 25])
    hop, b, t = r.randint(1, n_fft), r.randint(1, 3), r.randint(n_fft, 5 * n_fft)
    wave, window = torch.randn(b, t), torch.hann_window(n_fft)
    n_mels = r.randint(1, 6)
    fb = torch.rand(n_fft // 2 + 1, n_mels)
    frames = 1 + t // hop
    use_lengths = r.random() < 0.5
    lengths = torch.randint(n_fft // 2 + 1, t + 1, (b,)) if use_lengths else None
    frame_lengths = 1 + lengths // hop if use_lengths else None
    log_mode = r.choice([0, 1, 2, 3, 4])
    dct = torch.randn(n_mels, r.randint(1, n_mels)) if log_mode >= 3 and r.random() < 0.5 else None
    top_db = 80.0 if log_mode == 3 and r.random() < 0.5 else -1.0
    complex_out = log_mode == 0 and r.random() < 0.2
    args = [wave, window, fb, lengths, frame_lengths, frames, n_fft, hop, -(n_fft // 2), 0, r.choice([0, 1, 2, 3]),
            False, 0.0, r.choice([1.0, 2.0, 0.5]), log_mode, 1e-10, 0, 0.0, False,
            r.random() < 0.5 and not complex_out, dct, top_db, 1, complex_out]
    if r.random() < 0.5:
        return "mel_spectrogram", args
    out = OPS.mel_spectrogram(*args)
    return "mel_spectrogram_backward", [torch.randn_like(out), *args]


BUILDERS = [attention_args, varlen_args, pack_args, fusion_args, combine_args, mel_args]


def mutate(r: random.Random, args: list) -> str:
    """Apply one mutation to a random argument in place; return what was done."""
    i = r.randrange(len(args))
    a = args[i]
    if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
        return f"[{i}]{mutate(r, a)}"
    if isinstance(a, list):
        args[i] = a + [r.randint(-3, 9)] if r.random() < 0.5 else a[:-1]
        return f"[{i}] list length"
    if isinstance(a, torch.Tensor):
        choice = r.randrange(10)
        if choice == 0 and a.dim() > 0:
            args[i] = a.narrow(-1, 0, max(a.shape[-1] - 1, 0))
        elif choice == 1:
            args[i] = a.unsqueeze(0)
        elif choice == 2 and a.dim() > 0:
            args[i] = a.flatten()
        elif choice == 3 and a.dim() > 0:
            args[i] = torch.cat([a, a.narrow(0, 0, min(1, a.shape[0]))]) if a.shape[0] else a.new_zeros((1,) + a.shape[1:])
        elif choice == 4:
            args[i] = a.to(r.choice([torch.float16, torch.float64, torch.int32, torch.int64, torch.bool]))
        elif choice == 5 and a.dim() >= 2:
            args[i] = a.transpose(0, -1)
        elif choice == 6 and a.numel() and not a.is_floating_point():
            big = a.long().clone()
            big.view(-1)[r.randrange(big.numel())] = r.choice([-1, 2**31, 2**32 + 1, -(2**40), 10**6])
            args[i] = big.to(a.dtype) if r.random() < 0.5 else big
        elif choice == 7 and a.numel() and a.is_floating_point():
            bad = a.contiguous().clone()
            bad.view(-1)[r.randrange(bad.numel())] = r.choice([float("nan"), float("inf"), -float("inf"), 1e38])
            args[i] = bad
        elif choice == 8:
            args[i] = a.new_empty((0,) + tuple(a.shape[1:]))
        else:
            args[i] = None
        return f"[{i}] tensor mutation {choice}"
    if isinstance(a, bool):
        args[i] = not a
        return f"[{i}] flip"
    if isinstance(a, int):
        args[i] = r.choice([-1, 0, 2**31, 2**62, a + 1, a * 1000 + 7])
        return f"[{i}] int -> {args[i]}"
    if isinstance(a, float):
        args[i] = r.choice([float("nan"), float("inf"), -1.0, 0.0, 1e300])
        return f"[{i}] float -> {args[i]}"
    if isinstance(a, str):
        args[i] = r.choice(["", "bogus", a.upper()])
        return f"[{i}] str"
    if a is None:
        args[i] = torch.zeros(r.randint(0, 3))
        return f"[{i}] None -> tensor"
    return f"[{i}] unchanged"


def main(seed: int, first: int, end: int) -> None:
    torch.set_num_threads(1 + (first // 300) % 2)  # every other batch on two threads (parallel_for's split paths)
    counts: dict[str, list[int]] = {}
    for case in range(first, end):
        r = random.Random(seed * 1_000_003 + case)
        torch.manual_seed(seed * 1_000_003 + case)
        op, args = r.choice(BUILDERS)(r)
        mutations = [mutate(r, args) for _ in range(r.randint(1, 3))]
        print(f"case {case} {op} {'; '.join(mutations)}", flush=True)
        tally = counts.setdefault(op, [0, 0])
        try:
            getattr(OPS, op)(*args)
            tally[1] += 1
        except (RuntimeError, ValueError, TypeError):
            tally[0] += 1
    print("counts " + " ".join(f"{op}:{raised}/{raised + returned}" for op, (raised, returned) in sorted(counts.items())))
    print("done", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
