"""Remarks and reports: stable names, every field in JSON, a readable table, a picture."""

from __future__ import annotations

import json

import pytest

from braze.report import GraphRecord, Remark, Report, layer_of


def sample() -> Report:
    applied = Remark("applied", "norm-quant", "norm-quant", "layers.0.norm", "model.py:12",
                     ("rmsnorm", "fp8_quant"), "fused rmsnorm -> fp8_quant into one kernel",
                     args=(("eps", 1e-6), ("width", 64)))
    missed = Remark("missed", "norm-quant", "quant-input-not-norm", "layers.0.mlp", "model.py:30",
                    ("fp8_quant",), "FP8 quant not fused", reason="the quantized tensor comes from `mul_2`",
                    suggestion="activation+quant fusion is not implemented yet")
    g = GraphRecord(index=0, device="cpu", remarks=[applied, missed], stats={"norm-quant": {"applied": 1}},
                    pass_seconds={"norm-quant": 0.01}, compile_seconds=2.0,
                    kernels={"layers.0": 3, "final_norm": 1}, stock_kernels={"layers.0": 4, "final_norm": 1})
    return Report([g])


def test_remark_names_are_kebab_case():
    with pytest.raises(AssertionError):
        Remark("applied", "p", "Not_Kebab", "", "", (), "m")


def test_json_round_trip_carries_every_field():
    rep = sample()
    doc = json.loads(rep.to_json())
    r = doc["graphs"][0]["remarks"][1]
    assert set(r) == {"kind", "pass", "name", "location", "source", "ops", "message", "reason", "suggestion", "args"}
    assert doc["summary"]["kernels"] == 4 and doc["summary"]["stock_kernels"] == 5
    again = Report.from_json(rep.to_json())
    assert again.remarks == rep.remarks and again.graphs[0].kernels == rep.graphs[0].kernels


def test_str_shows_the_table_then_missed_reasons():
    text = str(sample())
    assert text.splitlines()[0] == "braze report: 1 graph(s), 1 applied, 1 missed, 0 failed"
    assert "norm-quant                      1        1        0         0" in text
    assert "layers.0                                       4       3" in text
    assert text.index("missed:") > text.index("layers.0")
    assert "reason: the quantized tensor comes from `mul_2`" in text
    assert "braze passes: 10.0 ms of 2.00 s compile (0.5%)" in text


def test_plot_writes_a_png(tmp_path):
    path = sample().plot(str(tmp_path / "k.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_layer_of():
    assert layer_of("layers.3.self_attn.kv_a_layernorm") == "layers.3"
    assert layer_of("model.layers.12.mlp") == "model.layers.12"
    assert layer_of("final_norm") == "final_norm" and layer_of("") == "(top)"


def test_str_summarizes_branch_decisions_per_layer():
    def fork(location: str, decision: str) -> Remark:
        return Remark("analysis", "branches", "independent-branches", location, "", ("mm", "mm"),
                      f"2 independent branches: {decision}", args=(("decision", decision),))

    rep = Report([GraphRecord(index=0, remarks=[fork("layers.0.input_layernorm", "merge+serial"),
                                                fork("layers.0.mlp", "overlap"),
                                                fork("layers.1.input_layernorm", "merge+serial")])])
    assert rep.branches_per_layer() == {"layers.0": {"merge+serial": 1, "overlap": 1},
                                        "layers.1": {"merge+serial": 1}}
    text = str(rep)
    assert "(no branches on a second stream" in text
    assert "  layers.0                              merge+serial: 1, overlap: 1\n" in text
    moved = Remark("applied", "dual-stream", "dual-stream", "layers.0.mlp", "", ("fork", "join"), "moved",
                   args=(("stream0", ["mm_1", "topk"]), ("stream1", ["mm_2", "silu", "mul", "mm_3", "add"])))
    rep.graphs[0].remarks.append(moved)
    assert rep.side_stream_nodes() == {"layers.0": ["mm_2", "silu", "mul", "mm_3", "add"]}
    assert "merge+serial: 1, overlap: 1; side stream: 5 nodes (mm_2, silu, mul, mm_3, ...)" in str(rep)
