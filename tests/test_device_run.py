"""The staged device run (benchmarks/run_device.sh, mmfuse.bench.device_run) rehearsed on the CPU:
stages stopped at their limits and recorded, JSON written per stage, the dry run end to end, and
the ingest of a returned $OUT (mmfuse.bench.device_results) on a synthetic one."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmfuse.bench import device_results
from mmfuse.bench.device_run import Stage, Step, run_stages

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_stage_over_its_limit_is_stopped_recorded_and_the_next_one_runs(tmp_path):
    lines = []
    stages = [
        Stage("fast", 30, lambda ctx: [Step("hello", _python("print('hello')"))]),
        # a child that would outlive its parent: the whole process group is stopped
        Stage("slow", 1.5, lambda ctx: [Step("sleep", _python(
            "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "time.sleep(60)"))]),
        Stage("after", 30, lambda ctx: [Step("fails", _python("raise SystemExit(3)"))]),
    ]
    start = time.monotonic()
    records = run_stages(stages, tmp_path, budget=60, printer=lines.append)
    assert time.monotonic() - start < 20
    assert [r["status"] for r in records] == ["ok", "timeout", "failed"]
    slow = json.loads((tmp_path / "01-slow.json").read_text())
    assert slow["status"] == "timeout" and 1.4 <= slow["seconds"] < 12
    assert "over its time limit" in (tmp_path / "01-slow.log").read_text()
    assert json.loads((tmp_path / "02-after.json").read_text())["steps"][0]["rc"] == 3
    assert "hello" in (tmp_path / "00-fast.log").read_text()
    assert [r["stage"] for r in json.loads((tmp_path / "summary.json").read_text())] == ["fast", "slow", "after"]
    # one line per stage as it ends, then the table
    assert lines[0].startswith("[00-fast] ok") and lines[1].startswith("[01-slow] timeout")
    assert any(l.startswith("slow") and "timeout" in l for l in lines[4:])


def test_the_run_budget_caps_stages_and_skips_what_has_no_time(tmp_path):
    stages = [Stage("long", 100, lambda ctx: [Step("sleep", _python("import time; time.sleep(30)"))]),
              Stage("never", 100, lambda ctx: [Step("x", _python("print(1)"))])]
    records = run_stages(stages, tmp_path, budget=2, printer=lambda line: None)
    assert [r["status"] for r in records] == ["timeout", "skipped"]
    assert records[0]["seconds"] < 12
    assert json.loads((tmp_path / "01-never.json").read_text())["summary"] == "no time left in the run's budget"


def test_a_stage_whose_plan_raises_is_recorded_and_the_run_goes_on(tmp_path):
    def broken(ctx):
        raise RuntimeError("no such tool")

    records = run_stages([Stage("broken", 10, broken), Stage("next", 10, lambda ctx: [Step("ok", _python("0"))])],
                         tmp_path, budget=30, printer=lambda line: None)
    assert [r["status"] for r in records] == ["error", "ok"]
    assert "no such tool" in records[0]["summary"]


def test_dry_run_end_to_end(tmp_path):
    """run_device.sh --dry-run: every stage's logic on this CPU machine, JSON per stage, the table."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_device.sh"), "--dry-run", "--out", str(out)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = json.loads((out / "summary.json").read_text())
    status = {r["stage"]: r["status"] for r in records}
    assert status == {"env": "ok", "build": "ok", "correctness": "ok", "sanitizer": "unavailable",
                      "headline": "ok", "rest": "ok"}, records
    for index, r in enumerate(records):
        assert (out / f"{index:02d}-{r['stage']}.json").exists() and (out / f"{index:02d}-{r['stage']}.log").exists()
    assert json.loads((out / "00-env.json").read_text())["versions"]["torch"] == torch.__version__
    assert "GPU tests collected" in json.loads((out / "02-correctness.json").read_text())["summary"]
    assert "case fusion: done" in (out / "03-sanitizer.log").read_text()  # the cases ran on the C++ kernels
    headline = json.loads((out / "headline.json").read_text())
    assert headline["complete"] and len({(r["op"], r["case"]) for r in headline["rows"]}) == 12
    table = result.stdout.strip().splitlines()
    assert any(l.startswith("stage") and "status" in l for l in table[-30:])
    assert any("headline: mmfuse vs the fastest peer" in l for l in table)


CORRECTNESS_LOG = """
$ python -m pytest -v -rN -p no:cacheprovider -n 8 -m cuda
[gw0] [ 10%] PASSED tests/test_attention_kernels.py::test_cuda_kernel_forward_and_gradients[cuda-fp16]
[gw1] [ 20%] PASSED tests/test_attention_kernels.py::test_cuda_kernel_varlen_equals_padded[cuda]
[gw1] [ 30%] FAILED tests/test_fusion.py::test_combine_kernels_forward_and_backward[cuda-gated]
[gw0] [ 40%] PASSED tests/test_fusion.py::test_fused_concat_linear_kernels_forward_and_backward[cuda-gelu]
tests/test_pack_modalities.py::test_unpack_inverts_pack[cuda] PASSED                  [ 50%]

$ python -m pytest -v -rN -p no:cacheprovider -n 8 -m triton and not slow
[gw0] [ 10%] FAILED tests/test_attention_kernels.py::test_triton_kernel[triton]
"""


def _synthetic_out(out: Path, sanitizer_tools: dict) -> None:
    out.mkdir()
    env = {"stage": "env", "status": "ok", "seconds": 3.0, "limit_s": 45, "summary": "x",
           "versions": {"gpu": "NVIDIA H200", "torch": "2.11.0+cu130"}}
    (out / "00-env.json").write_text(json.dumps(env))
    (out / "02-correctness.log").write_text(CORRECTNESS_LOG)
    (out / "02-correctness.json").write_text(json.dumps({"stage": "correctness", "status": "failed", "seconds": 80,
                                                        "limit_s": 150, "summary": "4 passed, 2 failed"}))
    (out / "03-sanitizer.json").write_text(json.dumps({"stage": "sanitizer", "status": "ok", "seconds": 50,
                                                      "limit_s": 100, "summary": "s", "tools": sanitizer_tools}))
    rows = [{"op": "cross_attention", "case": "headline fwd unmasked", "backend": b, "median_ms": ms,
             "tflops_or_gbps": 1.0, "unit": "TFLOP/s", "peer": p, "peer_ms": pms, "speedup": round(pms / ms, 3),
             "dtype": "bfloat16", "device": "NVIDIA H200"}
            for b, ms in (("cuda", 2.0), ("triton", 1.0)) for p, pms in (("sdpa-flash", 1.5), ("sdpa-cudnn", 3.0))]
    meta = {"device_name": "NVIDIA H200", "threads": 16, "torch": "2.11.0", "mmfuse": "0.1.0", "commit": "abc"}
    (out / "headline.json").write_text(json.dumps({"meta": meta, "rows": rows, "complete": True}))


def test_ingest_a_returned_out(tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    _synthetic_out(out, {t: "clean" for t in ("memcheck", "racecheck", "synccheck", "initcheck")})
    done = device_results.ingest(out, results, plot=False)
    assert done["slug"] == "h200"
    assert {"h200-run.json", "h200-correctness.log", "h200-headline.json", "h200-headline.md"} <= set(done["written"])
    found = done["candidates"]
    # the failed fusion test takes combine_modalities off; the triton failure is not a CUDA test
    assert found["ops"]["combine_modalities"] == {"passed": 0, "failed": 1}
    assert found["ops"]["cross_attention"] == {"passed": 2, "failed": 0}
    assert found["verified"] == ["cross_attention", "cross_attention_varlen", "fused_concat_linear",
                                 "pack_modalities", "unpack_modalities"]
    md = (results / "h200-headline.md").read_text()
    assert "Losses (kernel backends, speedup < 1): 1 of 4" in md and "cuda vs sdpa-flash: 0.75×" in md


def test_ingest_lists_nothing_verified_without_a_clean_sanitizer(tmp_path, capsys):
    out = tmp_path / "out"
    _synthetic_out(out, {"memcheck": "clean", "racecheck": "errors (rc 9)"})
    assert device_results.main([str(out), "--results", str(tmp_path / "r"), "--no-plot"]) == 0
    printed = capsys.readouterr().out
    assert "VERIFIED_CUDA_OPS candidates): none" in printed
    assert "cross_attention          cuda tests 2 passed, 0 failed" in printed


def test_pinned_triton_config_leaves_one_candidate(monkeypatch):
    pytest.importorskip("triton")
    import triton

    from mmfuse.triton.attention_kernels import SMALL_TILE, TENSOR_CORE_TILES, fitting_configs

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in TENSOR_CORE_TILES + (SMALL_TILE,)]
    args = {"Q": torch.empty(1, dtype=torch.bfloat16)}
    meta = {"PRECISION": "tf32", "BLOCK_D": 64}
    monkeypatch.delenv("MMFUSE_TRITON_PIN_CONFIG", raising=False)
    tuned = fitting_configs(configs, args, **meta)
    assert len(tuned) > 1
    monkeypatch.setenv("MMFUSE_TRITON_PIN_CONFIG", "1")
    assert fitting_configs(configs, args, **meta) == tuned[:1]


def test_a_prebuilt_that_does_not_load_falls_back_to_a_build(tmp_path, monkeypatch):
    """The build stage's choice, on a stand-in checkout (its own ``mmfuse`` whose build_info
    says the extension did not load): the carried file is removed again and a build is planned."""
    from mmfuse.bench import device_run

    root = tmp_path / "checkout"
    (root / "mmfuse").mkdir(parents=True)
    (root / "mmfuse" / "__init__.py").write_text(
        "def build_info():\n    return {'extension_loaded': False, 'cuda': False, 'load_error': 'undefined symbol'}\n")
    carried = tmp_path / "prebuilt"
    carried.mkdir()
    (carried / "_ops.abi3.so").write_bytes(b"not an ELF file")
    (carried / "_build.json").write_text("{}")
    monkeypatch.setattr(device_run, "ROOT", root)
    ctx = {"log": tmp_path / "build.log"}
    steps = device_run.build_stage(False, carried, "9.0a").plan(ctx)
    assert [s.name for s in steps] == ["build_ext", "load"]
    assert steps[0].env["TORCH_CUDA_ARCH_LIST"] == "9.0a"
    assert ctx["build"] == "prebuilt did not load; built here for 9.0a"
    assert not list((root / "mmfuse").glob("_ops*.so")) and not (root / "mmfuse" / "_build.json").exists()
    assert "load rc 1" in ctx["log"].read_text()


FAKE_SANITIZER = """#!{python}
import os, sys, time
args = sys.argv[1:]
tool = args[args.index("--tool") + 1]
rest = args[args.index("--print-limit") + 2:]
if tool == "initcheck":
    time.sleep(60)  # a tool over its limit
if tool == "racecheck":
    print("========= Error: Race reported between Write access ...")
    sys.exit(9)
os.execv(rest[0], rest + ["--device", "cpu"])
"""


def test_sanitizer_tools_run_at_once_with_a_verdict_each(tmp_path, capsys):
    """The device run's sanitizer driver with a stand-in compute-sanitizer: one clean tool (it
    runs the cases, on the C++ kernels), one that reports errors, one stopped at the limit."""
    from mmfuse.bench.sanitize_cases import run_tools

    fake = tmp_path / "compute-sanitizer"
    fake.write_text(FAKE_SANITIZER.format(python=sys.executable))
    fake.chmod(0o755)
    start = time.monotonic()
    verdicts = run_tools(["memcheck", "racecheck", "initcheck"], str(fake), tmp_path / "out", limit=20,
                         cases=["pack_modalities", "fusion"])
    assert time.monotonic() - start < 40
    assert verdicts == {"memcheck": "clean", "racecheck": "errors (rc 9)", "initcheck": "timeout"}
    assert "case fusion: done" in (tmp_path / "out" / "sanitizer-memcheck.log").read_text()
    assert "tool memcheck: clean" in capsys.readouterr().out
