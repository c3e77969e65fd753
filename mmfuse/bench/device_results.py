"""Ingest a staged device run: ``python -m mmfuse.bench.device_results OUT [--results DIR]``.

Turns the ``$OUT`` folder that ``benchmarks/run_device.sh`` returned into committed files under
``benchmarks/results/``, named by the device (``h200-*``): the stage records
(``h200-run.json``), the test and sanitizer logs, and per benchmark stage the rows
(``h200-headline.json``), a Markdown table with the losses listed and a plot, in the format of
the CPU results (``mmfuse-bench --json/--markdown/--plot``). Then prints the CUDA kernels that
passed every correctness test and every sanitizer tool of the run: the candidates for
``mmfuse.backends.VERIFIED_CUDA_OPS`` (a person adds them, with the commit of these files).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from mmfuse.bench.cli import _plot, markdown, slower_than_reference

ROOT = Path(__file__).resolve().parents[2]

# which public ops (VERIFIED_CUDA_OPS keys) a CUDA test exercises: (file pattern, test-name
# pattern) -> ops; the first matching entry wins
OP_TESTS = (
    (r"attention|cross_attention", r"varlen", ("cross_attention", "cross_attention_varlen")),
    (r"attention|cross_attention", r"", ("cross_attention",)),
    (r"pack_modalities", r"", ("pack_modalities", "unpack_modalities")),
    (r"fusion", r"concat_linear", ("fused_concat_linear",)),
    (r"fusion", r"combine", ("combine_modalities",)),
    (r"fusion", r"", ("fused_concat_linear", "combine_modalities")),
    (r"spectrogram|mfcc|mel", r"whisper", ("whisper_log_mel",)),
    (r"spectrogram|mfcc|mel", r"kaldi", ("kaldi_fbank",)),
    (r"spectrogram|mfcc|mel", r"", ("mel_spectrogram", "spectrogram")),
)
_RESULT = re.compile(r"\b(PASSED|FAILED|ERROR)\b.*?(tests/[\w/]+\.py)::(\S+)|(tests/[\w/]+\.py)::(\S+)\s+(PASSED|FAILED|ERROR)\b")


def test_results(log: str) -> list[tuple[str, str, str]]:
    """(file, test id, outcome) per test line of the CUDA tests' step (the one run with ``-m cuda``)
    of the correctness stage's verbose pytest log (plain or xdist lines)."""
    found, in_cuda_step = [], False
    for line in log.splitlines():
        if line.startswith("$ "):  # the stage log's header of each step
            in_cuda_step = " -m cuda" in line
            continue
        m = _RESULT.search(line) if in_cuda_step else None
        if m:
            outcome, path, test = (m.group(1), m.group(2), m.group(3)) if m.group(1) else \
                (m.group(6), m.group(4), m.group(5))
            found.append((path, test, outcome))
    return found


def ops_of(path: str, test: str) -> tuple[str, ...]:
    name = Path(path).stem
    for file_pattern, test_pattern, ops in OP_TESTS:
        if re.search(file_pattern, name) and re.search(test_pattern, test):
            return ops
    return ()


def candidates(out: Path) -> dict:
    """Per op: CUDA tests passed/failed in the run, and whether every sanitizer tool was clean;
    ``verified`` lists the ops with tests passed, none failed, and a clean sanitizer."""
    log = _read(out, "correctness")
    per_op: dict[str, dict] = {}
    for path, test, outcome in test_results(log):
        for op in ops_of(path, test):
            entry = per_op.setdefault(op, {"passed": 0, "failed": 0})
            entry["passed" if outcome == "PASSED" else "failed"] += 1
    sanitizer = _record(out, "sanitizer")
    tools = sanitizer.get("tools", {}) if sanitizer else {}
    clean = bool(tools) and all(v == "clean" for v in tools.values())
    verified = sorted(op for op, e in per_op.items() if e["passed"] and not e["failed"] and clean)
    return {"ops": per_op, "sanitizer": sanitizer.get("summary") if sanitizer else "not run",
            "sanitizer_clean": clean, "verified": verified}


def _record(out: Path, stage: str) -> dict | None:
    found = sorted(out.glob(f"[0-9][0-9]-{stage}.json"))
    return json.loads(found[0].read_text()) if found else None


def _read(out: Path, stage: str) -> str:
    found = sorted(out.glob(f"[0-9][0-9]-{stage}.log"))
    return found[0].read_text(errors="replace") if found else ""


def device_slug(out: Path) -> str:
    """``h200`` from "NVIDIA H200" (the env stage's versions), else the first bench JSON's device."""
    env = _record(out, "env") or {}
    name = (env.get("versions") or {}).get("gpu")
    if not name:
        for path in sorted(out.glob("*.json")):
            data = json.loads(path.read_text())
            if isinstance(data, dict) and data.get("meta", {}).get("device_name"):
                name = data["meta"]["device_name"]
                break
    name = (name or "device").replace("NVIDIA", "").strip().lower()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "device"


def ingest(out: Path, results: Path, plot: bool = True) -> dict:
    results.mkdir(parents=True, exist_ok=True)
    slug = device_slug(out)
    written = []
    summary = out / "summary.json"
    stages = json.loads(summary.read_text()) if summary.exists() else \
        [json.loads(p.read_text()) for p in sorted(out.glob("[0-9][0-9]-*.json"))]
    found = candidates(out)
    (results / f"{slug}-run.json").write_text(json.dumps({"stages": stages, "candidates": found}, indent=1))
    written.append(f"{slug}-run.json")
    for stage in ("correctness", "sanitizer"):
        logs = sorted(out.glob(f"[0-9][0-9]-{stage}.log"))
        if logs:
            shutil.copyfile(logs[0], results / f"{slug}-{stage}.log")
            written.append(f"{slug}-{stage}.log")
    for bench in ("headline", "rest"):
        path = out / f"{bench}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        rows, meta = data["rows"], data["meta"]
        data["slower_than_reference"] = slower_than_reference(rows)
        (results / f"{slug}-{bench}.json").write_text(json.dumps(data, indent=1))
        (results / f"{slug}-{bench}.md").write_text(markdown(rows, meta, data["slower_than_reference"]))
        written += [f"{slug}-{bench}.json", f"{slug}-{bench}.md"]
        if plot and rows:
            try:
                _plot(rows, meta, results / f"{slug}-{bench}.png")
                written.append(f"{slug}-{bench}.png")
            except ImportError:  # matplotlib is a bench extra
                pass
    return {"slug": slug, "written": written, "candidates": found, "stages": stages}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the $OUT folder the device run returned")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        print(f"device_results: {args.out} is not a folder", file=sys.stderr)
        return 2
    done = ingest(args.out, args.results, plot=not args.no_plot)
    for r in done["stages"]:
        print(f"{r['stage']:<12} {r['status']:<12} {r['seconds']:>7.1f} s  {r['summary']}")
    print(f"wrote {', '.join(done['written'])} under {args.results}")
    found = done["candidates"]
    print(f"sanitizer: {found['sanitizer']}")
    for op, e in sorted(found["ops"].items()):
        print(f"  {op:<24} cuda tests {e['passed']} passed, {e['failed']} failed")
    print("passed every correctness and sanitizer check (VERIFIED_CUDA_OPS candidates): "
          + (", ".join(found["verified"]) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
