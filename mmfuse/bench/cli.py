"""``mmfuse-bench``: time every op and backend against its peers on the device present.

Prints a table (our median, the peer's, the speedup = peer time / our time, measured side by
side in one run), and with ``--json`` writes DESIGN.md's rows, with ``--plot`` a PNG of the
speedups. CPU timings state the thread count; GPU timings use CUDA events.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

import mmfuse
from mmfuse.bench import attention, fusion, packing, spectrogram
from mmfuse.bench.timing import median_ms

SUITES = {"attention": attention, "spectrogram": spectrogram, "fusion": fusion, "packing": packing}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmfuse-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--op", action="append", choices=sorted(SUITES) + ["all"], default=None,
                        help="which op family to time (repeatable; default all)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--backend", action="append", default=None, help="mmfuse backends to time (default: all available)")
    parser.add_argument("--quick", action="store_true", help="one small shape per op, few repeats")
    parser.add_argument("--json", type=Path, default=None, help="write the result rows to this JSON file")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of the speedups (needs matplotlib)")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backends = args.backend or [b for b in mmfuse.available_backends(device) if b != "reference" or device.type == "cpu"]
    if device.type == "cpu" and "triton" in backends:
        backends.remove("triton")  # the interpreter is for tests, not timing
    ops = sorted(SUITES) if not args.op or "all" in args.op else args.op
    meta = _meta(device)
    print(f"mmfuse-bench on {meta['device_name']} ({device.type}, {meta['threads']} threads), torch {torch.__version__}, "
          f"mmfuse {mmfuse.__version__} @ {meta['commit']}; backends {backends}", file=sys.stderr)

    rows = []
    all_cases = [c for op in ops for c in SUITES[op].cases(device, args.quick, backends)]
    for i, case in enumerate(all_cases, 1):
        print(f"[{i}/{len(all_cases)}] {case.op} {case.case}", file=sys.stderr, flush=True)
        rows += _run_case(case, device, args.quick, meta)
    _print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        _plot(rows, meta, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _run_case(case, device, quick, meta) -> list[dict]:
    repeat = 5 if quick else 15
    timings = {}
    for name, fn in {**case.ours, **case.peers}.items():
        try:
            timings[name] = median_ms(fn, device, warmup=1 if quick else 3, repeat=repeat)
        except NotImplementedError as exc:  # a backend without a kernel for this op yet
            print(f"  skip {name}: {exc}", file=sys.stderr)
    rows = []
    for backend in case.ours:
        if backend not in timings:
            continue
        ms = timings[backend]
        rate = case.work / (ms * 1e-3) / (1e12 if case.unit == "TFLOP/s" else 1e9) if case.work else None
        base = {"op": case.op, "case": case.case, "dtype": case.dtype, "device": meta["device_name"],
                "backend": backend, "median_ms": round(ms, 4), "tflops_or_gbps": rate and round(rate, 3),
                "unit": case.unit, "threads": meta["threads"], "torch": meta["torch"], "mmfuse": meta["mmfuse"],
                "commit": meta["commit"]}
        peers = [p for p in case.peers if p in timings] or [None]
        for peer in peers:
            peer_ms = timings.get(peer)
            rows.append({**base, "peer": peer, "peer_ms": peer_ms and round(peer_ms, 4),
                         "speedup": peer_ms and round(peer_ms / ms, 3)})
    return rows


def _print_table(rows: list[dict]) -> None:
    header = f"{'op':<20} {'case':<52} {'backend':<9} {'ms':>9} {'peer':<40} {'peer ms':>9} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        peer_ms = f"{r['peer_ms']:.3f}" if r["peer_ms"] else "-"
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        print(f"{r['op']:<20} {r['case'][:52]:<52} {r['backend']:<9} {r['median_ms']:>9.3f} "
              f"{(r['peer'] or '-')[:40]:<40} {peer_ms:>9} {speedup:>8}")


def _plot(rows: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["speedup"]]
    labels = [f"{r['op']} | {r['case'][:40]} | {r['backend']} vs {r['peer']}" for r in rows]
    fig, ax = plt.subplots(figsize=(12, max(3, 0.28 * len(rows) + 1.5)))
    ax.barh(range(len(rows)), [r["speedup"] for r in rows], color=["tab:green" if r["speedup"] >= 1 else "tab:red" for r in rows])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup (peer time / mmfuse time)")
    ax.set_title(f"mmfuse {meta['mmfuse']} on {meta['device_name']} ({meta['threads']} threads), torch {meta['torch']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _meta(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device_name": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "mmfuse": mmfuse.__version__, "commit": commit, "command": " ".join(sys.argv)}


if __name__ == "__main__":
    sys.exit(main())
