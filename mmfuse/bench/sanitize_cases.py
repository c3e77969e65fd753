"""One tiny case per CUDA kernel, for compute-sanitizer (the staged device run, stage 3).

    compute-sanitizer --tool racecheck python3 -m mmfuse.bench.sanitize_cases [--case NAME ...]

Each case calls the public op with ``backend="cuda"`` at sizes with ragged tails (odd lengths,
a key tile cut short, a query tile cut short), forward and backward, and synchronizes, so a
report names the kernel of that case; seconds, not minutes, under racecheck. ``--device cpu``
runs the same calls on the C++ kernels: the dry run uses it, so the script cannot break unseen.
``--tools memcheck,racecheck,...`` runs the tools over the cases concurrently (the device run).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import mmfuse


def _attention(device, backend):
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    for dim, dim_v, len_q in ((64, 64, 37), (128, 64, 5), (128, 128, 1)):  # len_q 1: the split-KV decode
        q = torch.randn(2, len_q, 4, dim, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(2, 83, 2, dim, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(2, 83, 2, dim_v, device=device, dtype=dtype, requires_grad=True)
        kv_lens = torch.tensor([83, 50], device=device)
        out = mmfuse.cross_attention(q, k, v, kv_lens=kv_lens, causal=len_q > 1, backend=backend)
        out.float().square().sum().backward()


def _attention_masked(device, backend):
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    q = torch.randn(2, 29, 2, 64, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 70, 2, 64, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 70, 2, 64, device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(2, 1, 29, 70, device=device, dtype=dtype, requires_grad=True)
    out = mmfuse.cross_attention(q, k, v, attn_mask=bias, dropout_p=0.2, softcap=20.0, backend=backend)
    out.float().sum().backward()


def _attention_varlen(device, backend):
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    lens_q, lens_k = [7, 40, 1], [65, 3, 90]
    cu_q = torch.tensor([0, 7, 47, 48], device=device, dtype=torch.int32)
    cu_k = torch.tensor([0, 65, 68, 158], device=device, dtype=torch.int32)
    q = torch.randn(sum(lens_q), 4, 64, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(sum(lens_k), 2, 64, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(sum(lens_k), 2, 64, device=device, dtype=dtype, requires_grad=True)
    out = mmfuse.cross_attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True, backend=backend)
    out.float().sum().backward()


def _packing(device, backend):
    features = [torch.randn(3, n, 24, device=device, requires_grad=True) for n in (17, 5, 30)]
    lengths = [torch.tensor(l, device=device) for l in ([17, 0, 9], [5, 5, 1], [30, 2, 0])]
    packed = mmfuse.pack_modalities(features, lengths, backend=backend)
    packed.tokens.square().sum().backward()


def _fusion(device, backend):
    xs = [torch.randn(37, d, device=device, requires_grad=True) for d in (24, 40, 8)]
    weight = torch.randn(33, 72, device=device, requires_grad=True)
    bias = torch.randn(33, device=device, requires_grad=True)
    mmfuse.fused_concat_linear(xs, weight, bias, "gelu", backend=backend).sum().backward()
    ps = [torch.randn(5, 37, 33, device=device, requires_grad=True) for _ in range(3)]
    gates = [torch.randn(5, 37, 33, device=device, requires_grad=True) for _ in range(3)]
    mmfuse.combine_modalities(ps, "gated", gate_logits=gates, activation="silu", backend=backend).sum().backward()


def _mel(device, backend):
    audio = (torch.randn(2, 16000 + 123, device=device) * 0.1).requires_grad_()
    mmfuse.mel_spectrogram(audio, n_mels=80, backend=backend).sum().backward()
    mmfuse.whisper_log_mel(audio.detach(), backend=backend)


CASES = {"cross_attention": _attention, "cross_attention_masked": _attention_masked,
         "cross_attention_varlen": _attention_varlen, "pack_modalities": _packing, "fusion": _fusion,
         "mel_spectrogram": _mel}


def run_tools(tools: list[str], sanitizer: str, out: Path, limit: float, cases: list[str] | None = None) -> dict:
    """Each compute-sanitizer ``tool`` over this script's cases, all tools at once (one GPU, one
    process each: the stage's time is the slowest tool's, not the sum), each stopped at ``limit``
    seconds. Writes ``sanitizer-<tool>.log`` under ``out``; prints and returns one verdict per tool."""
    out.mkdir(parents=True, exist_ok=True)
    chosen = [a for c in cases or [] for a in ("--case", c)]
    procs = {}
    for tool in tools:
        log = open(out / f"sanitizer-{tool}.log", "w")
        argv = [sanitizer, "--tool", tool, "--error-exitcode", "9", "--print-limit", "20",
                sys.executable, "-m", "mmfuse.bench.sanitize_cases", *chosen]
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        procs[tool] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True),
                       log, time.monotonic())
    verdicts = {}
    end = time.monotonic() + limit
    for tool, (proc, log, start) in procs.items():
        try:
            rc = proc.wait(timeout=max(end - time.monotonic(), 0.1))
            verdict = "clean" if rc == 0 else f"errors (rc {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            verdict = "timeout"
        log.close()
        done = (out / f"sanitizer-{tool}.log").read_text(errors="replace").count("case ")
        verdicts[tool] = verdict
        print(f"tool {tool}: {verdict} ({time.monotonic() - start:.1f} s, {done} case(s) done)", flush=True)
    return verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=sorted(CASES), default=None)
    parser.add_argument("--device", default="cuda", help="cuda (the CUDA kernels) or cpu (the C++ kernels)")
    parser.add_argument("--tools", default=None,
                        help="comma-separated compute-sanitizer tools to run over the cases, all at once")
    parser.add_argument("--sanitizer", default="compute-sanitizer", help="the compute-sanitizer executable")
    parser.add_argument("--out", type=Path, default=Path("."), help="where --tools writes sanitizer-<tool>.log")
    parser.add_argument("--limit", type=float, default=120.0, help="seconds for every tool (with --tools)")
    args = parser.parse_args(argv)
    if args.tools:
        verdicts = run_tools(args.tools.split(","), args.sanitizer, args.out, args.limit, args.case)
        return 0 if all(v == "clean" for v in verdicts.values()) else 1
    device = torch.device(args.device)
    backend = "cuda" if device.type == "cuda" else "cpu"
    torch.manual_seed(0)
    for name in args.case or CASES:
        start = time.monotonic()
        CASES[name](device, backend)
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"case {name}: done ({backend}, {time.monotonic() - start:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
