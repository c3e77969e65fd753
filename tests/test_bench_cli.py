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


def _row(op, case, backend, ms, peer="peer", peer_ms=1.0):
    return {"op": op, "case": case, "backend": backend, "median_ms": ms, "peer": peer, "peer_ms": peer_ms,
            "speedup": round(peer_ms / ms, 3), "tflops_or_gbps": None}


def test_a_kernel_slower_than_the_reference_is_flagged(capsys):
    rows = [_row("combine_modalities", "fwd sum", "cpu", 2.0), _row("combine_modalities", "fwd sum", "reference", 1.5),
            _row("combine_modalities", "fwd gated", "cpu", 1.0), _row("combine_modalities", "fwd gated", "reference", 3.0),
            _row("pack_modalities", "fwd B=8", "cpu", 0.5)]  # no reference timed: nothing to compare
    flagged = cli.slower_than_reference(rows)
    assert [(f["case"], f["backend"]) for f in flagged] == [("fwd sum", "cpu")]
    assert flagged[0]["ratio"] == 0.75
    cli._print_checks(rows, flagged)
    out = capsys.readouterr().out
    assert "1 of 2 (case, backend) pairs" in out and "FLAG combine_modalities | fwd sum | cpu" in out
    assert "LOSS combine_modalities | fwd sum | cpu vs peer: 0.50x" in out


def test_plot_has_one_log_panel_per_op_and_the_reference_only_when_asked(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_row("cross_attention", f"fwd Lq={n}", b, ms, peer=p, peer_ms=2.0)
            for n in (77, 256) for b, ms in (("cpu", 1.0), ("reference", 4.0)) for p in ("sdpa", "sdpa-math")]
    rows += [_row("pack_modalities", "fwd B=8", "cpu", 0.1, peer_ms=3.0)]
    meta = {"mmfuse": "0", "commit": "x", "device_name": "cpu", "threads": 2, "torch": "t"}
    axes = cli._plot(rows, meta, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 0
    assert [ax.get_title(loc="left") for ax in axes] == ["cross_attention", "pack_modalities"]
    assert all(ax.get_xscale() == "log" for ax in axes)
    assert all(any(line.get_xdata()[0] == 1.0 for line in ax.get_lines()) for ax in axes)  # the 1x line
    labels = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert labels == ["cpu vs sdpa", "cpu vs sdpa-math"]
    assert [t.get_text() for t in axes[0].get_yticklabels()] == ["fwd Lq=77", "fwd Lq=256"]
    axes = cli._plot(rows, meta, tmp_path / "b.png", with_reference=True)
    labels = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert "reference vs sdpa" in labels


def test_fusion_cases_have_a_compiled_peer():
    import torch

    from mmfuse.bench import fusion

    peers = fusion._peers("composition", lambda t: torch.nn.functional.silu(t[0] * t[1]),
                          [torch.randn(5, 3), torch.randn(5, 3)])
    assert set(peers) == {"composition", "torch.compile(composition)"}
    for runs in peers.values():
        assert set(runs) == {"fwd", "fwd+bwd"}
        runs["fwd+bwd"]()


def test_markdown_lists_every_case_and_the_losses():
    rows = [_row("combine_modalities", "fwd sum", "cpu", 2.0, peer="eager", peer_ms=4.0),
            _row("combine_modalities", "fwd sum", "cpu", 2.0, peer="compiled", peer_ms=1.0),
            _row("combine_modalities", "fwd gated", "cpu", 1.0, peer="eager", peer_ms=3.0)]
    meta = {"mmfuse": "0", "commit": "x", "device_name": "cpu", "threads": 2, "torch": "t", "command": "c"}
    text = cli.markdown(rows, meta, [])
    assert "| fwd sum | cpu | 2.000 | 4.000, **2.00×** | 1.000, **0.50×** |" in text
    assert "| fwd gated | cpu | 1.000 | 3.000, **3.00×** | — |" in text
    assert "1 of 3 (case, peer) pairs" in text and "- combine_modalities | fwd sum | cpu vs compiled: 0.50×" in text


def test_streaming_rows_give_throughput_in_stream_seconds(tmp_path, capsys):
    """The streaming suite (issue #32): FeatureStream against OnlineFbank and sliding-window
    recomputation, the rate column in seconds of audio per second."""
    out = tmp_path / "bench.json"
    assert cli.main(["--op", "streaming", "--quick", "--backend", "cpu", "--case", "10 ms", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["op"] for r in rows} == {"feature_stream"} and len({r["case"] for r in rows}) == 2
    for r in rows:
        assert r["unit"] == "stream-s/s"
        # 16 streams x 10 ms per call
        assert r["tflops_or_gbps"] == pytest.approx(16 * 0.01 / (r["median_ms"] * 1e-3), rel=1e-2)
    assert any("sliding window" in r["peer"] for r in rows)
    assert "throughput feature_stream" in capsys.readouterr().out
