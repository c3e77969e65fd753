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
from mmfuse.bench import attention, fusion, headline, masks, packing, spectrogram, streaming
from mmfuse.bench.timing import median_ms

SUITES = {"attention": attention, "masks": masks, "spectrogram": spectrogram, "fusion": fusion, "packing": packing,
          "streaming": streaming}
# the rate column: work per second in these units (streaming: seconds of audio, summed over streams)
UNIT_SCALE = {"TFLOP/s": 1e12, "GB/s": 1e9, "stream-s/s": 1.0}
# named selections of cases at their own sizes, not part of --op all
NAMED_SUITES = {"headline": headline}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmfuse-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--op", action="append", choices=sorted(SUITES) + ["all"], default=None,
                        help="which op family to time (repeatable; default all)")
    parser.add_argument("--suite", action="append", choices=sorted(NAMED_SUITES), default=None,
                        help="a named suite (headline: the 12 cases a first GPU lease times first)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--backend", action="append", default=None, help="mmfuse backends to time (default: all available)")
    parser.add_argument("--quick", action="store_true", help="one small shape per op, few repeats")
    parser.add_argument("--case", action="append", default=None,
                        help="time only the cases whose name contains this text (repeatable; e.g. 'decode')")
    parser.add_argument("--json", type=Path, default=None, help="write the result rows to this JSON file")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of the speedups (needs matplotlib)")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="write every case as a Markdown table (one row per case and backend, a column per peer) "
                             "with the losses listed, for the README")
    parser.add_argument("--with-reference", action="store_true",
                        help="also plot the pure-PyTorch reference backend against the peers")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backends = args.backend or [b for b in mmfuse.available_backends(device) if b != "reference" or device.type == "cpu"]
    if device.type == "cpu" and "triton" in backends:
        backends.remove("triton")  # the interpreter is for tests, not timing
    ops = [] if args.suite and not args.op else sorted(SUITES) if not args.op or "all" in args.op else args.op
    modules = [SUITES[op] for op in ops] + [NAMED_SUITES[s] for s in args.suite or []]
    meta = _meta(device)
    print(f"mmfuse-bench on {meta['device_name']} ({device.type}, {meta['threads']} threads), torch {torch.__version__}, "
          f"mmfuse {mmfuse.__version__} @ {meta['commit']}; backends {backends}", file=sys.stderr)

    rows = []
    all_cases = [c for module in modules for c in module.cases(device, args.quick, backends)
                 if not args.case or any(text in c.case for text in args.case)]
    for i, case in enumerate(all_cases, 1):
        print(f"[{i}/{len(all_cases)}] {case.op} {case.case}", file=sys.stderr, flush=True)
        rows += _run_case(case, device, args.quick, meta)
        if args.json:  # after every case: a run stopped part-way still leaves the rows it timed
            _write_json(args.json, meta, rows, complete=i == len(all_cases))
    _print_table(rows)
    slower = slower_than_reference(rows)
    _print_checks(rows, slower)
    if args.json:
        _write_json(args.json, meta, rows, complete=True)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(rows, meta, slower))
        print(f"wrote {args.markdown}", file=sys.stderr)
    if args.plot:
        _plot(rows, meta, args.plot, with_reference=args.with_reference)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _write_json(path: Path, meta: dict, rows: list[dict], complete: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows, "slower_than_reference": slower_than_reference(rows),
                               "complete": complete}, indent=1))
    tmp.replace(path)


# a kernel within this fraction of the reference's time is not flagged: two medians of the same
# work on a shared machine differ by about that much from run to run
SLOWER_TOLERANCE = 0.05


def slower_than_reference(rows: list[dict]) -> list[dict]:
    """Cases where a kernel backend took longer than mmfuse's own pure-PyTorch reference in the
    same run (by more than ``SLOWER_TOLERANCE``): a bug by DESIGN.md's rule (``auto`` picks the
    kernel, never the reference)."""
    ms = {(r["op"], r["case"], r["backend"]): r["median_ms"] for r in rows}
    flagged = []
    for (op, case, backend), t in sorted(ms.items()):
        ref = ms.get((op, case, "reference"))
        if backend != "reference" and ref is not None and t > ref * (1 + SLOWER_TOLERANCE):
            flagged.append({"op": op, "case": case, "backend": backend, "median_ms": t, "reference_ms": ref,
                            "ratio": round(ref / t, 3)})
    return flagged


def _print_checks(rows: list[dict], slower: list[dict]) -> None:
    kernels = {(r["op"], r["case"], r["backend"]) for r in rows if r["backend"] != "reference"}
    compared = {k for k in kernels if any(r["op"] == k[0] and r["case"] == k[1] and r["backend"] == "reference"
                                          for r in rows)}
    print(f"\ncheck: kernel slower than the mmfuse reference — {len(slower)} of {len(compared)} (case, backend) pairs")
    for f in slower:
        print(f"  FLAG {f['op']} | {f['case']} | {f['backend']} {f['median_ms']:.3f} ms > reference "
              f"{f['reference_ms']:.3f} ms ({f['ratio']:.2f}x)")
    losses = [r for r in rows if r["backend"] != "reference" and r["speedup"] is not None and r["speedup"] < 1]
    timed = [r for r in rows if r["backend"] != "reference" and r["speedup"] is not None]
    print(f"losses: {len(losses)} of {len(timed)} (kernel, peer) rows below 1.00x")
    for r in losses:
        print(f"  LOSS {r['op']} | {r['case']} | {r['backend']} vs {r['peer']}: {r['speedup']:.2f}x")
    for r in rows:
        if r.get("unit") == "stream-s/s" and r["tflops_or_gbps"]:
            work = r["tflops_or_gbps"] * r["median_ms"] * 1e-3  # stream-seconds per call
            peer = f"; {r['peer']}: {work / (r['peer_ms'] * 1e-3):.0f} stream-s/s" if r["peer_ms"] else ""
            print(f"  throughput {r['op']} | {r['case']} | {r['backend']}: {r['tflops_or_gbps']:.0f} stream-s/s, "
                  f"{r['median_ms']:.3f} ms per call{peer} ({r['speedup']}x)")
        if r.get("of_copy") is not None and r["backend"] != "reference" and r["peer"] == _first_peer(rows, r):
            print(f"  bandwidth {r['op']} | {r['case']} | {r['backend']}: {r['tflops_or_gbps']:.1f} GB/s = "
                  f"{100 * r['of_copy']:.0f}% of copy_ ({r['copy_gbps']:.1f} GB/s)")


def markdown(rows: list[dict], meta: dict, slower: list[dict]) -> str:
    """Every (op, case, backend) as one table row: our time, then each peer's time and the
    speedup against it; then the losses (speedup < 1) and the kernel-slower-than-reference flags."""
    lines = [f"mmfuse {meta['mmfuse']} @ {meta['commit']}, {meta['device_name']}, {meta['threads']} threads, "
             f"torch {meta['torch']}; `{meta.get('command', '')}`", ""]
    by_op: dict[str, list[dict]] = {}
    for r in rows:
        by_op.setdefault(r["op"], []).append(r)
    for op, op_rows in by_op.items():
        peers = list(dict.fromkeys(r["peer"] for r in op_rows if r["peer"]))
        lines += [f"**{op}**", "", "| case | backend | ms | " + " | ".join(f"{p} (ms, speedup)" for p in peers) + " |",
                  "| --- | --- | ---: | " + " | ".join("---:" for _ in peers) + " |"]
        seen = dict.fromkeys((r["case"], r["backend"]) for r in op_rows)
        for case, backend in seen:
            cells = {r["peer"]: r for r in op_rows if r["case"] == case and r["backend"] == backend}
            ms = next(iter(cells.values()))["median_ms"]
            extra = ""
            first = next(iter(cells.values()))
            if first.get("of_copy") is not None:
                extra = f" ({first['tflops_or_gbps']:.1f} GB/s, {100 * first['of_copy']:.0f}% of copy_)"
            elif first.get("unit") == "stream-s/s" and first["tflops_or_gbps"]:
                extra = f" ({first['tflops_or_gbps']:.0f} stream-s/s)"
            cols = [f"{cells[p]['peer_ms']:.3f}, **{cells[p]['speedup']:.2f}×**" if p in cells and cells[p]["speedup"]
                    else "—" for p in peers]
            lines.append(f"| {case} | {backend} | {ms:.3f}{extra} | " + " | ".join(cols) + " |")
        lines.append("")
    losses = [r for r in rows if r["backend"] != "reference" and r["speedup"] is not None and r["speedup"] < 1]
    timed = [r for r in rows if r["backend"] != "reference" and r["speedup"] is not None]
    lines.append(f"Losses (kernel backends, speedup < 1): {len(losses)} of {len(timed)} (case, peer) pairs.")
    lines += [f"- {r['op']} | {r['case']} | {r['backend']} vs {r['peer']}: {r['speedup']:.2f}×" for r in losses]
    lines.append("")
    lines.append(f"Kernel slower than the mmfuse reference: {len(slower)}.")
    lines += [f"- {f['op']} | {f['case']} | {f['backend']}: {f['median_ms']:.3f} ms vs {f['reference_ms']:.3f} ms"
              for f in slower]
    return "\n".join(lines) + "\n"


def _first_peer(rows: list[dict], row: dict):
    return next(r["peer"] for r in rows if r["op"] == row["op"] and r["case"] == row["case"])


def _run_case(case, device, quick, meta) -> list[dict]:
    repeat = 5 if quick else 15
    fns = {**case.ours, **case.peers}
    if case.copy is not None:
        fns["\0copy"] = case.copy
    # each contender timed on its own, back to back (steady state: its allocations reused, the
    # thread pools of the library it calls warm); interleaved rounds were tried and make
    # whoever follows a library that leaves threads spinning, or a heap trim, pay for it
    timings = {}
    for name, fn in fns.items():
        try:
            timings[name] = median_ms(fn, device, warmup=1 if quick else 3, repeat=repeat)
        except NotImplementedError as exc:  # a backend without a kernel for this op
            print(f"  skip {name}: {exc}", file=sys.stderr)
    copy_ms = timings.pop("\0copy", None)
    copy_gbps = case.work / (copy_ms * 1e-3) / 1e9 if copy_ms and case.work else None
    rows = []
    for backend in case.ours:
        if backend not in timings:
            continue
        ms = timings[backend]
        rate = case.work / (ms * 1e-3) / UNIT_SCALE[case.unit] if case.work else None
        base = {"op": case.op, "case": case.case, "dtype": case.dtype, "device": meta["device_name"],
                "backend": backend, "median_ms": round(ms, 4), "tflops_or_gbps": rate and round(rate, 3),
                "unit": case.unit, "threads": meta["threads"], "torch": meta["torch"], "mmfuse": meta["mmfuse"],
                "commit": meta["commit"]}
        if copy_gbps is not None:
            base.update(copy_gbps=round(copy_gbps, 2), of_copy=round(rate / copy_gbps, 3))
        peers = [p for p in case.peers if p in timings] or [None]
        for peer in peers:
            peer_ms = timings.get(peer)
            rows.append({**base, "peer": peer, "peer_ms": peer_ms and round(peer_ms, 4),
                         "speedup": peer_ms and float(f"{peer_ms / ms:.4g}")})
    return rows


def _print_table(rows: list[dict]) -> None:
    header = f"{'op':<20} {'case':<52} {'backend':<9} {'ms':>9} {'peer':<44} {'peer ms':>9} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        peer_ms = f"{r['peer_ms']:.3f}" if r["peer_ms"] else "-"
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        print(f"{r['op']:<20} {r['case'][:52]:<52} {r['backend']:<9} {r['median_ms']:>9.3f} "
              f"{(r['peer'] or '-')[:44]:<44} {peer_ms:>9} {speedup:>8}")


def _plot(rows: list[dict], meta: dict, path: Path, *, with_reference: bool = False) -> list:
    """One panel per op: a row per case, one bar per (mmfuse backend, peer) pair, speedup on a
    log axis with the 1x line; green wins, red losses, the ratio written at each bar's end."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = [r for r in rows if r["speedup"] and (with_reference or r["backend"] != "reference")]
    ops = sorted({r["op"] for r in rows})
    if not ops:
        return []
    pairs = {op: sorted({(r["backend"], r["peer"]) for r in rows if r["op"] == op}) for op in ops}
    cases = {op: list(dict.fromkeys(r["case"] for r in rows if r["op"] == op)) for op in ops}
    heights = [max(1.6, 0.22 * len(cases[op]) * len(pairs[op]) + 0.9) for op in ops]
    fig, axes = plt.subplots(len(ops), 1, figsize=(14, sum(heights) + 0.8), gridspec_kw={"height_ratios": heights},
                             squeeze=False)
    speeds = [r["speedup"] for r in rows]
    lo, hi = min(min(speeds), 0.5) / 1.3, max(max(speeds), 2.0) * 2.5
    hatches = ["", "//", "..", "xx", "\\\\", "++"]
    for ax, op in zip(axes[:, 0], ops):
        n_pairs = len(pairs[op])
        bar = 0.8 / n_pairs
        for j, (backend, peer) in enumerate(pairs[op]):
            ys, xs = [], []
            for i, case in enumerate(cases[op]):
                r = next((r for r in rows if r["op"] == op and r["case"] == case and r["backend"] == backend
                          and r["peer"] == peer), None)
                if r is not None:
                    ys.append(i + (j - (n_pairs - 1) / 2) * bar)
                    xs.append(r["speedup"])
            colors = ["tab:green" if x >= 1 else "tab:red" for x in xs]
            ax.barh(ys, xs, height=bar * 0.9, color=colors, hatch=hatches[j % len(hatches)], edgecolor="white",
                    linewidth=0.3)
            for y, x in zip(ys, xs):
                ax.text(x * 1.04, y, f"{x:.2f}x", va="center", fontsize=6.5)
        ax.axvline(1.0, color="black", linewidth=1.0)
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.set_yticks(range(len(cases[op])), [_short_case(c) for c in cases[op]], fontsize=7.5)
        ax.invert_yaxis()
        ax.set_title(op, fontsize=10, loc="left", fontweight="bold")
        ax.grid(axis="x", which="both", alpha=0.25)
        # colour says win (green) or loss (red); the hatch says which (backend, peer) pair
        handles = [Patch(facecolor="0.75", edgecolor="white", hatch=hatches[j % len(hatches)], label=f"{b} vs {p}")
                   for j, (b, p) in enumerate(pairs[op])]
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    axes[-1, 0].set_xlabel("speedup = peer time / mmfuse time (log scale; right of the line = mmfuse faster)")
    fig.suptitle(f"mmfuse {meta['mmfuse']} @ {meta['commit']} on {meta['device_name']} ({meta['threads']} threads), "
                 f"torch {meta['torch']}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [ax for ax in axes[:, 0]]


def _short_case(case: str) -> str:
    """A case label that fits a row: the shape parameters that are the same in every case of a
    suite (B=8 H=8 D=64) dropped, long lists kept."""
    for fixed in (" B=8 H=8 D=64",):
        case = case.replace(fixed, "")
    return case if len(case) <= 60 else case[:57] + "..."


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
