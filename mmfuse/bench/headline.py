"""``mmfuse-bench --suite headline``: the 12 cases a first GPU lease times before anything else.

Attention (bf16, head dim 64 and 128, forward and forward+backward, unmasked and with about
30 % of the keys padded away through ``kv_lens``) against every SDPA backend that takes the case
(flash, cuDNN, memory-efficient; a backend that refuses a case is left out of its row), with
TFLOP/s; the Whisper front end at B = 128 x 30 s against torchaudio, with GB/s against this
device's copy bandwidth (the memory-bound limit); ``pack_modalities`` and ``fused_concat_linear``
against their PyTorch compositions. ``--quick`` shrinks every case (the CPU dry run).
"""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

import mmfuse
from mmfuse.bench.attention import _sdpa_backends
from mmfuse.bench.case import Case, forward_and_backward
from mmfuse.bench.packing import _cat_loop
from mmfuse.bench.spectrogram import SAMPLE_RATE


def cases(device: torch.device, quick: bool, backends: list[str]):
    backends = [b for b in backends if b != "reference"] or backends
    yield from _attention(device, quick, backends)
    yield _whisper(device, quick, backends)
    yield from _packing(device, quick, backends)
    yield _concat_linear(device, quick, backends)


def _attention(device, quick, backends):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch, heads, length = (2, 2, 96) if quick else (8, 16, 2048)
    for dim in (64, 128):
        q, k, v = (torch.randn(batch, length, heads, dim, device=device, dtype=dtype) for _ in range(3))
        # about 30 % of the keys padded away: lengths spread over [0.4, 1.0] x length, mean 0.7
        kv_lens = torch.linspace(0.4 * length, length, batch, device=device).round().long()
        keep = torch.arange(length, device=device)[None, :] < kv_lens[:, None]
        for variant, kwargs, mask in (("unmasked", {}, None), ("kv_lens 30% padded", {"kv_lens": kv_lens},
                                                                keep[:, None, None, :])):
            ours = {b: forward_and_backward(lambda t, b=b, kw=kwargs: mmfuse.cross_attention(*t, backend=b, **kw),
                                            [q, k, v]) for b in backends}
            peers = {}
            for name, ctx in _sdpa_backends(device):
                if name == "sdpa-math":
                    continue  # not a fused kernel: the full run has it
                run = forward_and_backward(_sdpa(ctx, mask), [q, k, v])
                try:
                    run["fwd+bwd"]()
                except RuntimeError:  # this SDPA backend refuses the case (flash with a mask)
                    continue
                peers[name] = run
            visible = float(kv_lens.sum()) / (batch * length)
            for direction in ("fwd", "fwd+bwd"):
                flops = 4.0 * batch * heads * length * length * visible * dim * (1 if direction == "fwd" else 3.5)
                yield Case("cross_attention", f"headline {direction} {variant} L={length} B={batch} H={heads} D={dim}",
                           str(dtype).replace("torch.", ""), {b: r[direction] for b, r in ours.items()},
                           {p: r[direction] for p, r in peers.items()}, flops, "TFLOP/s")


def _sdpa(ctx, mask):
    def run(t):
        with ctx():
            return F.scaled_dot_product_attention(t[0].transpose(1, 2), t[1].transpose(1, 2), t[2].transpose(1, 2),
                                                  attn_mask=mask).transpose(1, 2)

    return run


def _whisper(device, quick, backends):
    batch, seconds = (2, 1) if quick else (128, 30)
    audio = torch.randn(batch, seconds * SAMPLE_RATE, device=device) * 0.1
    ours = {b: (lambda b=b: mmfuse.whisper_log_mel(audio, backend=b)) for b in backends}
    peers = {}
    if importlib.util.find_spec("torchaudio") is not None:
        import torchaudio

        mel = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=400, hop_length=160, n_mels=80,
                                                   norm="slaney", mel_scale="slaney").to(device)

        def whisper_torchaudio():  # Whisper's log-mel on torchaudio's mel spectrogram
            spec = mel(audio)[..., :-1].clamp(min=1e-10).log10()
            return (torch.maximum(spec, spec.amax(dim=(-2, -1), keepdim=True) - 8.0) + 4.0) / 4.0

        peers["torchaudio MelSpectrogram + Whisper log"] = whisper_torchaudio
    else:
        from mmfuse.bench.spectrogram import _whisper_stft_path
        from mmfuse.audio.filterbanks import melscale_fbanks

        filters = melscale_fbanks(201, 0.0, SAMPLE_RATE / 2, 80, SAMPLE_RATE, "slaney", "slaney").t().float().to(device)
        window = torch.hann_window(400, device=device)
        peers["torch.stft path"] = lambda: _whisper_stft_path(audio, filters, window)
    frames = seconds * SAMPLE_RATE // 160
    moved = audio.numel() * 4 + batch * 80 * frames * 4  # the least traffic: read the audio, write the mels
    src = torch.empty(moved // 8, device=device)
    dst = torch.empty_like(src)
    return Case("whisper_log_mel", f"headline B={batch} x {seconds} s", "float32", ours, peers, moved, "GB/s",
                copy=lambda: dst.copy_(src))


def _packing(device, quick, backends):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch, dim, sizes = (4, 32, (40, 9, 17)) if quick else (64, 1024, (577, 77, 256))
    features = [torch.randn(batch, n, dim, device=device, dtype=dtype) for n in sizes]
    lengths = [torch.randint(0, n + 1, (batch,), device=device) for n in sizes]
    total = int(sum(int(n.sum()) for n in lengths))
    peer = forward_and_backward(lambda f: _cat_loop(f, lengths), features)
    ours = {b: forward_and_backward(lambda f, b=b: mmfuse.pack_modalities(
        f, lengths, total=total, max_seqlen=sum(sizes), backend=b).tokens, features) for b in backends}
    moved = 2 * total * dim * features[0].element_size()
    for direction, factor in (("fwd", 1), ("fwd+bwd", 2)):
        yield Case("pack_modalities", f"headline {direction} B={batch} D={dim} L={sizes}", str(dtype).replace("torch.", ""),
                   {b: r[direction] for b, r in ours.items()}, {"per-sample torch.cat": peer[direction]},
                   moved * factor, "GB/s")


def _concat_linear(device, quick, backends):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n, dims, out = (64, (48, 32, 16), 40) if quick else (8192, (1024, 768, 512), 1024)
    xs = [torch.randn(n, d, device=device, dtype=dtype) for d in dims]
    weight = torch.randn(out, sum(dims), device=device, dtype=dtype) / sum(dims) ** 0.5
    bias = torch.randn(out, device=device, dtype=dtype)
    leaves = [*xs, weight, bias]
    peer = forward_and_backward(lambda t: F.gelu(F.linear(torch.cat(t[:3], -1), t[3], t[4])), leaves)
    ours = {b: forward_and_backward(lambda t, b=b: mmfuse.fused_concat_linear(t[:3], t[3], t[4], "gelu", backend=b),
                                    leaves) for b in backends}
    return Case("fused_concat_linear", f"headline fwd+bwd N={n} D={dims} out={out} gelu",
                str(dtype).replace("torch.", ""), {b: r["fwd+bwd"] for b, r in ours.items()},
                {"torch.cat + F.linear + gelu": peer["fwd+bwd"]}, 2.0 * n * sum(dims) * out * 3, "TFLOP/s")

