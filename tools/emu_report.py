"""Bank conflicts and coalescing of the CUDA kernels, per kernel and code site, from the host
emulator's counters (csrc/emu/cuda_emu.h, sanitizer build): no GPU needed.

For each kernel, each instruction that touches shared memory is listed with its warp-wide
requests and the passes through the 32 four-byte banks they took against the ideal (one per
128 distinct bytes), and each instruction that touches a tensor in global memory with the
32-byte sectors against the ideal (distinct bytes / 32). The cases are small and fixed
(attention fwd+bwd at (Lq, Lk) = (77, 130), head dims 64 and 128; the mel spectrogram fwd+bwd
at n_fft 400 and 512), run through the same harnesses as the emulator tests.

    python tools/emu_report.py [--all]   # --all: also the sites at their ideal

Caveat: g++ splits a plain 16-byte store (`*reinterpret_cast<uint4*>(p) = ...`) into four
4-byte accesses, which are counted as four strided requests; the ldmatrix and cp.async wrappers
and scalar accesses are counted as the GPU issues them.
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from emulator_build import HARNESS_DIR, RequestCount, load_harness  # noqa: E402


def attention(head_dim: int) -> list[RequestCount]:
    from test_cross_attention_emulator import backward, forward, padded_sizes

    lib = load_harness("cross_attention", HARNESS_DIR / "cross_attention.cpp", sanitize=True)
    lib.count_requests(True)
    q = torch.randn(1, 77, 2, head_dim).half()
    k, v = (torch.randn(1, 130, 1, head_dim).half() for _ in range(2))
    args = padded_sizes(q, k, None, None, 1 / math.sqrt(head_dim), False)
    out, lse = forward(q, k, v, (1, 2, 77), args, lib)
    backward(torch.randn_like(q), None, q, k, v, out, lse, args, lib)
    return lib.request_counts()


def mel(n_fft: int) -> list[RequestCount]:
    import mmfuse
    import test_mel_spectrogram_emulator as mel_tests
    from mmfuse.ops import spectrogram_kernels as spec_ops

    lib = load_harness("mel_spectrogram", HARNESS_DIR / "mel_spectrogram.cpp", sanitize=True)
    mel_tests.harness = lambda: lib
    spec_ops._MEL_SPECTROGRAM["reference"] = functools.partial(spec_ops._spectrogram_kernel, mel_tests._emulated_op)
    lib.count_requests(True)
    x = torch.randn(1, 3 * n_fft, requires_grad=True)
    mmfuse.mel_spectrogram(x, n_fft=n_fft, hop_length=n_fft, n_mels=8, backend="reference").sum().backward()
    return lib.request_counts()


CASES = {
    "attention, head dim 64": functools.partial(attention, 64),
    "attention, head dim 128": functools.partial(attention, 128),
    "mel spectrogram, n_fft 400": functools.partial(mel, 400),
    "mel spectrogram, n_fft 512": functools.partial(mel, 512),
}


def print_report(title: str, counts: list[RequestCount], show_all: bool) -> None:
    print(f"== {title}")
    for kernel in sorted({c.kernel for c in counts}):
        rows = [c for c in counts if c.kernel == kernel and (show_all or c.ratio > 1.0)]
        print(f"  {kernel}: {sum(c.ratio <= 1.0 for c in counts if c.kernel == kernel)} sites at their ideal")
        for c in sorted(rows, key=lambda c: -c.ratio):
            unit = "bank passes" if c.space == "shared" else "sectors"
            print(f"    {c.space:6} {c.ratio:5.2f}x  {c.passes:>8} {unit:11} / {c.ideal:>8} ideal "
                  f"({c.requests} requests)  {c.site}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="list the sites at their ideal too")
    args = parser.parse_args()
    for title, run in CASES.items():
        print_report(title, run(), args.all)


if __name__ == "__main__":
    main()
