"""The staged GPU run: one call on a lent device that returns everything it finished.

``benchmarks/run_device.sh`` calls ``python3 -m mmfuse.bench.device_run``. A lease is 15
minutes of device time in all and at most 10 minutes a command, so the run is one call of at
most ``--budget`` seconds (default 480) cut into stages, each with its own hard limit. A stage
writes ``$OUT/NN-name.json`` (status, seconds, its commands' exit codes, a summary) and its log
the moment it ends, and prints one line, so a run cut short still returns every stage before it:

0. ``env``          nvidia-smi, versions, clocks;
1. ``build``        a carried prebuilt op library when it loads (``mmfuse/_ops.abi3.so`` and its
                    ``_build.json``, built on another machine against another torch: the stable
                    ABI makes it load in the device's torch, which this proves), else
                    ``setup.py build_ext`` for the device's architecture only, ``MAX_JOBS=16``;
2. ``correctness``  the CUDA tests and the emulator-versus-hardware harnesses, then the Triton
                    tests, one pinned tile configuration per kernel (``MMFUSE_TRITON_PIN_CONFIG``);
3. ``sanitizer``    compute-sanitizer memcheck, racecheck, synccheck and initcheck on one tiny
                    case per kernel (``mmfuse.bench.sanitize_cases``), after a few-second probe:
                    one of the device's two runtimes refuses the GPU to compute-sanitizer, and
                    the stage then records "unavailable" and hands its time on;
4. ``headline``     ``mmfuse-bench --suite headline`` (CUDA-event timing, every SDPA backend);
5. ``rest``         what time is left: the remaining benchmark cases with autotuning on.

The last lines printed are one table: stage, status, seconds, headline ratios.

``--dry-run`` runs the same logic on a CPU machine — the stages, their limits and JSON, the
table — with each GPU step replaced by its CPU equivalent or recorded as skipped; a test in
``make test`` runs it. ``python -m mmfuse.bench.device_results $OUT`` turns a returned ``$OUT``
into committed results.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
# the tools compute-sanitizer runs; each gets one process over every kernel's tiny case
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
SANITIZER_SECONDS_PER_KERNEL = 20  # per tool; the tools run at once
# what compute-sanitizer prints on the runtime where it cannot attach to the GPU (KINDS.md)
SANITIZER_REFUSED = ("Device not supported", "error 999", "CUDA_ERROR_UNKNOWN")


@dataclass
class Step:
    """One command of a stage: ``argv`` run with ``env`` added, at most ``limit`` seconds (the
    stage's remaining time caps it too)."""

    name: str
    argv: list[str]
    limit: float | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Stage:
    """``plan(ctx)`` returns the steps to run (it may run probes of its own, within the stage's
    time); ``summarize(ctx, results)`` returns (status, summary line, extra JSON fields)."""

    name: str
    limit: float
    plan: Callable[[dict], list[Step]]
    summarize: Callable[[dict, list[dict]], tuple[str, str, dict]] | None = None


def run_step(step: Step, log, deadline: float) -> dict:
    """Run one step with its output appended to ``log``; stopped (its whole process group) when
    its limit or the stage deadline passes. Returns {name, argv, rc, seconds, timed_out}."""
    limit = deadline - time.monotonic()
    if step.limit is not None:
        limit = min(limit, step.limit)
    start = time.monotonic()
    log.write(f"\n$ {' '.join(step.argv)}\n")
    log.flush()
    if limit <= 0:
        return {"name": step.name, "argv": step.argv, "rc": None, "seconds": 0.0, "timed_out": True}
    env = {**os.environ, **step.env}
    try:
        proc = subprocess.Popen(step.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
    except OSError as exc:  # the tool is not installed here
        log.write(f"cannot run: {exc}\n")
        return {"name": step.name, "argv": step.argv, "rc": 127, "seconds": round(time.monotonic() - start, 2),
                "timed_out": False}
    timed_out = False
    try:
        rc = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop(proc)
        rc = proc.returncode
        log.write(f"\n[stopped after {limit:.0f} s: over its time limit]\n")
    log.flush()
    return {"name": step.name, "argv": step.argv, "rc": rc, "seconds": round(time.monotonic() - start, 2),
            "timed_out": timed_out}


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the step's process group, SIGKILL it 5 s later if still there."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stages(stages: list[Stage], out: Path, budget: float, ctx: dict | None = None,
               printer: Callable[[str], None] = print) -> list[dict]:
    """Run ``stages`` in order within ``budget`` seconds in all; each stage's JSON and log are
    written under ``out`` when it ends. Returns the stage records (also in summary.json)."""
    out.mkdir(parents=True, exist_ok=True)
    ctx = {"out": out, "records": {}, **(ctx or {})}
    run_end = time.monotonic() + budget
    records = []
    for index, stage in enumerate(stages):
        stem = f"{index:02d}-{stage.name}"
        start = time.monotonic()
        left = run_end - start
        deadline = start + min(stage.limit, max(left, 0.0))
        record = {"stage": stage.name, "limit_s": stage.limit, "log": f"{stem}.log", "steps": []}
        ctx["log"] = out / f"{stem}.log"
        with open(out / f"{stem}.log", "w") as log:
            if left <= 1:
                status, summary, extra = "skipped", "no time left in the run's budget", {}
            else:
                try:
                    steps = stage.plan(ctx)
                    for step in steps:
                        record["steps"].append(run_step(step, log, deadline))
                    if stage.summarize is not None:
                        status, summary, extra = stage.summarize(ctx, record["steps"])
                    else:
                        status, summary, extra = _default_status(record["steps"])
                except Exception as exc:  # noqa: BLE001 - a broken stage must not lose the ones after it
                    log.write(f"stage error: {type(exc).__name__}: {exc}\n")
                    status, summary, extra = "error", f"{type(exc).__name__}: {exc}", {}
        if any(s["timed_out"] for s in record["steps"]) and status not in ("skipped", "unavailable"):
            status = "timeout"
        record.update(status=status, seconds=round(time.monotonic() - start, 2), summary=summary, **extra)
        (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
        ctx["records"][stage.name] = record
        records.append(record)
        printer(f"[{stem}] {status:<11} {record['seconds']:7.1f} s / {stage.limit:.0f} s  {summary}")
    (out / "summary.json").write_text(json.dumps(records, indent=1))
    for line in summary_table(records, ctx):
        printer(line)
    return records


def _default_status(steps: list[dict]) -> tuple[str, str, dict]:
    failed = [s["name"] for s in steps if s["rc"] not in (0, None) or s["timed_out"]]
    if not steps:
        return "skipped", "nothing to run", {}
    return ("failed" if failed else "ok"), (f"failed: {', '.join(failed)}" if failed else f"{len(steps)} step(s) ok"), {}


def summary_table(records: list[dict], ctx: dict) -> list[str]:
    """The closing table: stage, status, seconds (of its limit), and the headline ratios."""
    lines = ["", f"{'stage':<12} {'status':<12} {'seconds':>8} {'limit':>6}  summary"]
    for r in records:
        lines.append(f"{r['stage']:<12} {r['status']:<12} {r['seconds']:>8.1f} {r['limit_s']:>6.0f}  {r['summary']}")
    ratios = ctx["records"].get("headline", {}).get("ratios", [])
    if ratios:
        lines.append("")
        lines.append("headline: mmfuse vs the fastest peer in the same run (speedup = peer ms / ours)")
        for row in ratios:
            lines.append(f"  {row['case'][:72]:<72} {row['backend']:<7} {row['speedup']:>6.2f}x vs {row['peer']}")
    return lines


# ----------------------------------------------------------------------------------------------
# the stages


def _pytest_counts(log_path: Path, since: int = 0) -> dict:
    """passed/failed/error counts from pytest's per-test lines in the log (``-rA``-style or
    verbose xdist lines), which survive a stopped run, unlike the closing summary."""
    text = log_path.read_text(errors="replace")[since:] if log_path.exists() else ""
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for line in text.splitlines():
        for word in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
            if f" {word} " in f" {line} " and "::" in line:
                counts[{"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped"}[word]] += 1
                break
    return counts


def env_stage(dry_run: bool) -> Stage:
    versions = ("import json, platform, torch; import triton; "
                "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, "
                "'cuda': torch.version.cuda, 'triton': triton.__version__, "
                "'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None}))")

    def plan(ctx):
        steps = [Step("versions", [PYTHON, "-c", versions], limit=30)]
        if not dry_run:
            steps.insert(0, Step("nvidia-smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                                                 "clocks.sm,clocks.max.sm,clocks.mem", "--format=csv"], limit=10))
        return steps

    def summarize(ctx, steps):
        status, summary, _ = _default_status(steps)
        log = ctx["log"].read_text(errors="replace")
        found = [l for l in log.splitlines() if l.startswith("{")]
        info = json.loads(found[-1]) if found else {}
        return status, ", ".join(f"{k} {v}" for k, v in info.items()) or summary, {"versions": info}

    return Stage("env", 45, plan, summarize)


def build_stage(dry_run: bool, prebuilt: Path | None, arch: str) -> Stage:
    """A carried prebuilt op library when one is given and loads with CUDA kernels; otherwise a
    build for ``arch`` only. The dry run checks the extension already built here loads. The carried
    folder holds ``_ops*.so`` and ``_build.json`` (``_C``, the build-information module, is
    Python-version specific and optional: without it build_info() reads ``_build.json``)."""
    loads = [PYTHON, "-c", "import mmfuse, json; info = mmfuse.build_info(); print(json.dumps(info)); "
                           f"assert info['extension_loaded'] and ({dry_run} or info['cuda']), info['load_error']"]
    # the carried file itself must be what loaded, not an older build beside it
    loads_prebuilt = [PYTHON, "-c", loads[2] + "; import mmfuse._extension as e, os, sys; "
                      "assert e._OPS_LIBRARY.name in sys.argv[1:], e._OPS_LIBRARY"]

    def plan(ctx):
        if dry_run:
            ctx["build"] = "dry run: the extension built on this machine"
            return [Step("load", loads, limit=60)]
        if prebuilt is not None and any(prebuilt.glob("_ops*.so")):
            carried = list(prebuilt.glob("_ops*.so")) + list(prebuilt.glob("_build.json"))
            copied = [Path(shutil.copy2(f, ROOT / "mmfuse" / f.name)) for f in carried]
            probe = subprocess.run(loads_prebuilt + [c.name for c in copied if c.suffix == ".so"], capture_output=True,
                                   text=True, timeout=60, cwd=ROOT)
            with open(ctx["log"], "a") as log:
                log.write(f"prebuilt {[c.name for c in copied]}: load rc {probe.returncode}\n"
                          f"{(probe.stdout + probe.stderr)[-3000:]}\n")
            if probe.returncode == 0:
                ctx["build"] = f"prebuilt from {prebuilt}"
                return [Step("load", loads, limit=60)]
            for c in copied:  # it does not load on this stack: build instead, in the time left
                c.unlink()
            ctx["build"] = f"prebuilt did not load; built here for {arch}"
            return _build_steps(arch) + [Step("load", loads, limit=60)]
        ctx["build"] = f"built here for {arch}"
        return _build_steps(arch) + [Step("load", loads, limit=60)]

    def summarize(ctx, steps):
        status, summary, _ = _default_status(steps)
        build = next((s["seconds"] for s in steps if s["name"] == "build_ext"), None)
        return status, f"{ctx['build']}" + (f", build {build:.0f} s" if build is not None else ""), \
            {"how": ctx["build"], "build_seconds": build}

    return Stage("build", 240, plan, summarize)


def _build_steps(arch: str) -> list[Step]:
    return [Step("build_ext", [PYTHON, "setup.py", "-q", "build_ext", "--inplace"],
                 env={"TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 16)})]


def correctness_stage(dry_run: bool, workers: int) -> Stage:
    """The CUDA tests with the emulator-versus-hardware harnesses first (the verified list comes
    from them), then the Triton tests; verbose per-test lines, so a stopped run still counts."""
    # -v: one line per test as it ends (xdist: "[gw0] [ 5%] PASSED tests/..."); -rN: no closing
    # summary repeating them
    common = ["-m", "pytest", "-v", "-rN", "-p", "no:cacheprovider"]

    def plan(ctx):
        if dry_run:  # collect only: the selection expressions and every test file import
            return [Step("gpu tests (collect)", [PYTHON, *common, "--collect-only", "-q", "-m", "cuda or triton"],
                         limit=90)]
        run = common + (["-n", str(workers)] if workers > 1 else [])
        pinned = {"MMFUSE_TRITON_PIN_CONFIG": "1"}
        # the cuda step's cap leaves the triton step time even if the nvcc-built harnesses are slow
        return [Step("cuda tests", [PYTHON, *run, "-m", "cuda"], limit=100, env=pinned),
                Step("triton tests", [PYTHON, *run, "-m", "triton and not slow"], env=pinned)]

    def summarize(ctx, steps):
        status, summary, _ = _default_status(steps)
        counts = _pytest_counts(ctx["log"])
        if dry_run:
            collected = re.findall(r"(\d+)(?:/\d+)? tests? collected", ctx["log"].read_text(errors="replace"))
            return status, f"dry run: {collected[-1] if collected else 0} GPU tests collected" + \
                ("" if status == "ok" else f" ({summary})"), {"counts": counts}
        return status, f"{counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors" + \
            ("" if status == "ok" else f" ({summary})"), {"counts": counts}

    return Stage("correctness", 170, plan, summarize)


def sanitizer_stage(dry_run: bool) -> Stage:
    probe_code = "import torch; torch.zeros(1, device='cuda').add_(1); torch.cuda.synchronize(); print('probe ok')"

    def plan(ctx):
        from mmfuse.bench.sanitize_cases import CASES

        tool = shutil.which("compute-sanitizer")
        ctx["sanitizer"] = "available"
        if dry_run or tool is None:
            ctx["sanitizer"] = "unavailable: " + ("dry run (no GPU)" if dry_run else "compute-sanitizer not found")
            # the cases themselves still run, on the CPU, so the script cannot break unseen
            return [Step("cases on the cpu", [PYTHON, "-m", "mmfuse.bench.sanitize_cases", "--device", "cpu"],
                         limit=60)] if dry_run else []
        probe = subprocess.run([tool, "--tool", "memcheck", PYTHON, "-c", probe_code], capture_output=True,
                               text=True, timeout=60, cwd=ROOT)
        text = probe.stdout + probe.stderr
        with open(ctx["log"], "a") as log:
            log.write(f"probe rc {probe.returncode}\n{text[-2000:]}\n")
        if probe.returncode != 0 or any(s in text for s in SANITIZER_REFUSED) or "probe ok" not in text:
            ctx["sanitizer"] = "unavailable on this machine (compute-sanitizer refused the GPU)"
            return []
        # every tool at once, each over every kernel's case (one GPU; the sanitizers are CPU-bound)
        per_tool = SANITIZER_SECONDS_PER_KERNEL * len(CASES)
        return [Step("tools", [PYTHON, "-m", "mmfuse.bench.sanitize_cases", "--tools", ",".join(SANITIZER_TOOLS),
                               "--sanitizer", tool, "--out", str(ctx["out"]), "--limit", str(per_tool)],
                     limit=per_tool + 15)]

    def summarize(ctx, steps):
        if ctx["sanitizer"] != "available":
            ran = _default_status(steps)[0] if steps else "skipped"
            return "unavailable", f"{ctx['sanitizer']}; cases on the cpu: {ran}", {"tools": {}}
        found = re.findall(r"^tool (\w+): (.+?) \(", ctx["log"].read_text(errors="replace"), re.M)
        tools = {name: "not run" for name in SANITIZER_TOOLS} | dict(found)
        status = "ok" if all(v == "clean" for v in tools.values()) else "failed"
        return status, ", ".join(f"{k} {v}" for k, v in tools.items()), {"tools": tools}

    return Stage("sanitizer", 150, plan, summarize)


def bench_stage(name: str, dry_run: bool, args: list[str], limit: float, json_name: str) -> Stage:
    def plan(ctx):
        extra = ["--device", "cpu", "--quick"] if dry_run else []
        env = {} if name == "rest" else {"MMFUSE_TRITON_PIN_CONFIG": "1"}
        return [Step(name, [PYTHON, "-m", "mmfuse.bench.cli", *args, *extra, "--json", str(ctx["out"] / json_name)],
                     env=env)]

    def summarize(ctx, steps):
        status, summary, _ = _default_status(steps)
        path = ctx["out"] / json_name
        if not path.exists():
            return status, "no result JSON", {"ratios": []}
        rows = json.loads(path.read_text())["rows"]
        ratios = best_ratios(rows)
        wins = sum(r["speedup"] >= 1 for r in ratios)
        return status, f"{len(rows)} rows, {wins} of {len(ratios)} cases >= 1x the fastest peer", {"ratios": ratios}

    return Stage(name, limit, plan, summarize)


def best_ratios(rows: list[dict]) -> list[dict]:
    """Per (op, case): our fastest backend against the fastest peer (the ratio a user sees)."""
    best = {}
    for r in rows:
        if r["backend"] == "reference" or not r.get("peer_ms"):
            continue
        key = (r["op"], r["case"])
        mine = best.setdefault(key, {"case": f"{r['op']} {r['case']}", "backend": r["backend"],
                                     "ms": r["median_ms"], "peer": r["peer"], "peer_ms": r["peer_ms"]})
        if r["median_ms"] < mine["ms"]:
            mine.update(backend=r["backend"], ms=r["median_ms"])
        if r["peer_ms"] < mine["peer_ms"]:
            mine.update(peer=r["peer"], peer_ms=r["peer_ms"])
    return [{**v, "speedup": round(v["peer_ms"] / v["ms"], 3)} for v in best.values()]


def stages(dry_run: bool, prebuilt: Path | None, arch: str, workers: int) -> list[Stage]:
    return [
        env_stage(dry_run),
        build_stage(dry_run, prebuilt, arch),
        correctness_stage(dry_run, workers),
        sanitizer_stage(dry_run),
        bench_stage("headline", dry_run, ["--suite", "headline"], 120, "headline.json"),
        # the dry run times the smallest suite only (the others build large inputs and compile peers)
        bench_stage("rest", dry_run, ["--op", "packing" if dry_run else "all"], 600, "rest.json"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run_device.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="run the stages' logic on a CPU machine")
    parser.add_argument("--budget", type=float, default=float(os.environ.get("MMFUSE_DEVICE_BUDGET", 480)),
                        help="seconds for the whole run (default 480: one call of 8 minutes)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "device-out")))
    parser.add_argument("--prebuilt", type=Path, default=None,
                        help="a folder holding a carried op library (mmfuse/_ops*.so and mmfuse/_build.json), built elsewhere "
                             "against any CUDA torch >= 2.11 of the device's CUDA major version")
    parser.add_argument("--arch", default="9.0a", help="TORCH_CUDA_ARCH_LIST for a build on the device")
    parser.add_argument("--workers", type=int, default=8, help="pytest-xdist workers for the GPU tests (1: none)")
    parser.add_argument("--only", action="append", default=None, help="run only these stages (repeatable)")
    args = parser.parse_args(argv)
    if args.workers > 1 and not _has_xdist():
        args.workers = 1
    chosen = [s for s in stages(args.dry_run, args.prebuilt, args.arch, args.workers)
              if not args.only or s.name in args.only]
    records = run_stages(chosen, args.out, args.budget)
    return 0 if all(r["status"] in ("ok", "unavailable", "skipped") for r in records) else 1


def _has_xdist() -> bool:
    import importlib.util

    return importlib.util.find_spec("xdist") is not None


if __name__ == "__main__":
    sys.exit(main())
