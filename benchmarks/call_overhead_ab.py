"""Before/after per-call cost, interleaved: ``benchmarks/call_overhead.py`` run alternately on two
source trees (each with its extension built in place) in the same interpreter, so that a quiet or a
busy minute of a shared machine falls on both sides alike.

    python benchmarks/call_overhead_ab.py --before ../old-tree --pairs 5 \
        --json benchmarks/results/call-overhead-ab.json

Each run is a fresh process with ``PYTHONPATH`` set to its tree (checked: ``mmfuse.__file__`` must
lie in it). Per case it reports the median over the runs of each side and the ratio after/before,
and the same for the fastest run of each side (on a shared machine a busy minute only adds time).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
AFTER = HERE.parent


def run(tree: Path, calls: int, rounds: int, only: str | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    where = subprocess.run([sys.executable, "-c", "import mmfuse; print(mmfuse.__file__)"], env=env, cwd=tree,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"call_overhead_ab: PYTHONPATH={tree} imported mmfuse from {where}")
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, str(HERE / "call_overhead.py"), "--calls", str(calls), "--rounds", str(rounds),
                        "--json", out.name, *(["--only", only] if only else [])], env=env, cwd=tree, check=True, stdout=subprocess.DEVNULL)
        return json.loads(Path(out.name).read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the other source tree, extension built in place")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--only", default=None, help="the cases whose name contains this")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    sides = {"before": args.before, "after": AFTER}
    runs = {name: [] for name in sides}
    for i in range(args.pairs):
        for name, tree in (sides.items() if i % 2 == 0 else reversed(sides.items())):
            runs[name].append(run(tree, args.calls, args.rounds, args.only))
            print(f"pair {i + 1}/{args.pairs}: {name} done", flush=True)
    cases = [row["case"] for row in runs["after"][0]["rows"]]
    table = []
    print(f"\n{'case':42s} {'before us':>10s} {'after us':>10s} {'after/before':>13s}   (medians; then minima)")
    for case in cases:
        per = {name: [next(r["us_per_call"] for r in out["rows"] if r["case"] == case) for out in runs[name]]
               for name in sides}
        before, after = statistics.median(per["before"]), statistics.median(per["after"])
        # the fastest run of each side too: on a shared machine a busy minute only adds time
        low_before, low_after = min(per["before"]), min(per["after"])
        table.append({"case": case, "before_us": before, "after_us": after, "ratio": round(after / before, 3),
                      "before_min_us": low_before, "after_min_us": low_after,
                      "ratio_of_min": round(low_after / low_before, 3),
                      "before_runs": per["before"], "after_runs": per["after"]})
        print(f"{case:42s} {before:10.2f} {after:10.2f} {after / before:13.3f}   min {low_before:9.2f} "
              f"{low_after:9.2f} {low_after / low_before:6.3f}")
    if args.json:
        result = {"pairs": args.pairs, "calls": args.calls, "rounds": args.rounds,
                  "before": {"tree": str(args.before), "build": runs["before"][0]["build"]},
                  "after": {"tree": str(AFTER), "build": runs["after"][0]["build"]},
                  "torch": runs["after"][0]["torch"], "machine": runs["after"][0]["machine"], "rows": table}
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
