"""mmfuse-bench --quick --json writes DESIGN.md's rows, with speedups measured against peers."""
import json

import pytest

from mmfuse.bench import cli

ROW_KEYS = {"op", "case", "dtype", "device", "backend", "median_ms", "tflops_or_gbps", "peer", "peer_ms",
            "speedup", "torch", "mmfuse", "commit"}


def test_quick_json_rows(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["--op", "packing", "--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["op"] for r in rows} == {"pack_modalities"}
    assert {r["case"].split()[0] for r in rows} == {"fwd", "fwd+bwd"}
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["median_ms"] > 0 and r["peer_ms"] > 0
        assert r["speedup"] == pytest.approx(r["peer_ms"] / r["median_ms"], rel=1e-2)
    assert {"cpu", "reference"} <= {r["backend"] for r in rows}
    assert data["meta"]["threads"] >= 1
    table = capsys.readouterr().out
    assert "per-sample torch.cat" in table and "speedup" in table


def test_unknown_op_is_rejected():
    with pytest.raises(SystemExit):
        cli.main(["--op", "convolution"])
