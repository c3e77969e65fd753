"""Per-call cost of the compiled ops on the smallest benchmark cases: how much the calling
convention (torch's unboxed C++ kernels before, the LibTorch stable ABI's boxed kernels after)
adds where it matters most, when the kernel itself takes microseconds.

    python benchmarks/call_overhead.py --json benchmarks/results/call-overhead-<label>.json

Cases (CPU, float32, the `cpu` backend): ``pack_modalities`` forward at the packing suite's
smallest case (B=8, D=64, L=(64, 32, 48)), called through the registered op directly and
through ``mmfuse.pack_modalities``; ``cross_attention`` forward at the attention suite's
smallest case (B=8, H=8, D=64, Lq=77, Lk=32), the op directly and ``mmfuse.cross_attention``;
and ``unpack_modalities`` on a 1-token batch, where the call is nearly all there is. Each is
timed as the median over ``--rounds`` rounds of the mean of ``--calls`` back-to-back calls, so
one preempted call on a shared machine moves a round, not the answer. One thread
(``torch.set_num_threads(1)``): the calls are too small for the thread pool, and a second
thread only adds noise.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import mmfuse


def _per_call_us(fn, calls: int, rounds: int) -> float:
    for _ in range(max(calls // 10, 5)):
        fn()
    means = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        means.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(means)


def cases():
    gen = torch.Generator().manual_seed(0)
    batch, dim, sizes = 8, 64, (64, 32, 48)
    features = [torch.randn(batch, n, dim, generator=gen) for n in sizes]
    lengths = [torch.randint(0, n + 1, (batch,), generator=gen) for n in sizes]
    lens = torch.stack(lengths).to(torch.int32)
    seq = lens.sum(0)
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(seq, 0)
    total = int(cu[-1])
    pack = torch.ops.mmfuse.pack_modalities.default
    yield "pack_modalities op B=8 D=64", lambda: pack(features, lens, cu, None, False, total)
    yield "pack_modalities public B=8 D=64", lambda: mmfuse.pack_modalities(
        features, lengths, total=total, max_seqlen=sum(sizes), backend="cpu")

    one = torch.ones(1, 1, dtype=torch.int32)
    cu1 = torch.tensor([0, 1], dtype=torch.int32)
    token = torch.randn(1, 4, generator=gen)
    unpack = torch.ops.mmfuse.unpack_modalities.default
    yield "unpack_modalities op 1 token", lambda: unpack(token, one, cu1, [1])

    heads, hdim, lq, lk = 8, 64, 77, 32
    q = torch.randn(batch, lq, heads, hdim, generator=gen)
    k = torch.randn(batch, lk, heads, hdim, generator=gen)
    v = torch.randn(batch, lk, heads, hdim, generator=gen)
    fwd = torch.ops.mmfuse.cross_attention_fwd.default
    scale = hdim ** -0.5
    yield "cross_attention_fwd op Lq=77 Lk=32", lambda: fwd(q, k, v, None, None, scale, False)
    yield "cross_attention public Lq=77 Lk=32", lambda: mmfuse.cross_attention(q, k, v, backend="cpu")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", default=None, help="the cases whose name contains this")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    info = mmfuse.build_info()
    rows = []
    with torch.inference_mode():
        for name, fn in cases():
            if args.only and args.only not in name:
                continue
            us = _per_call_us(fn, args.calls, args.rounds)
            rows.append({"case": name, "us_per_call": round(us, 3)})
            print(f"{name:42s} {us:9.2f} us")
    out = {"torch": torch.__version__, "mmfuse": mmfuse.__version__, "build": info,
           "machine": platform.processor() or platform.machine(), "calls": args.calls, "rounds": args.rounds,
           "rows": rows}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1, default=str)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
