"""`python -m braze bench`: the no-GPU exit, argument errors, the harness end to end on CPU (tiny models),
tensor parallel under torchrun (gloo), and the GPU-only parts of the output rendered from a synthetic run."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from braze.bench_checks import compare_logits, compare_state
from braze.bench_output import markdown, write_results
from braze.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["bench", "--device", "cpu", "--size", "tiny", "--context", "12"]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _load(out: Path, stem: str) -> dict:
    for ext in ("json", "md", "png"):
        assert (out / f"{stem}.{ext}").stat().st_size > 0, f"{stem}.{ext} missing or empty"
    assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / f"{stem}.json").read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_no_gpu_is_a_clear_nonzero_exit():
    proc = subprocess.run([sys.executable, "-m", "braze", "bench", "--model", "minimax-m2.5", "--size", "tiny"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=_env())
    assert proc.returncode == 2
    assert "no CUDA GPU on this machine" in proc.stderr and "--device cpu" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--model", "llama"], "unknown ['llama']"),
    (["--tokens", "1,x"], "comma list of positive integers"),
    (["--tokens", "0"], "comma list of positive integers"),
    (["--variants", "eager,tvm"], "comma list of"),
    (["--context", "0"], "at least 1 cached token"),
])
def test_bad_arguments_exit_2_and_say_why(args, message, capsys):
    assert main([*TINY, *args]) == 2
    assert message in capsys.readouterr().err


def test_cpu_run_of_every_model_writes_json_markdown_plot(tmp_path):
    rc = main([*TINY, "--model", "all", "--tokens", "1,3", "--variants", "eager", "--out", str(tmp_path)])
    assert rc == 0
    for name in ("deepseek-v3.2", "minimax-m2.5", "qwen3.5"):
        doc = _load(tmp_path, f"{name}_tiny_tp1_cpu")
        assert doc["meta"]["device"] == "cpu" and "NOT comparable" in doc["meta"]["timing"]
        assert doc["meta"]["command"].startswith("python -m braze bench --device cpu")
        assert [(r["tokens"], r["variant"]) for r in doc["rows"]] == [(1, "eager"), (3, "eager")]
        for r in doc["rows"]:
            c = r["correctness"]
            assert r["ok"] and c["passed"] and c["finite"] and c["rel_fro"] == 0.0 and c["top1_agree"] == 1.0
            assert r["state"]["written"], "the step writes its caches"
            assert r["time"]["median_s"] > 0 and r["kernels"] is None
        for T in ("1", "3"):
            f = doc["floors"][T]
            assert f["floor_s"] == f["bytes_s"] > 0 and f["bytes_by_kind"]["weights"] > 0
        md = (tmp_path / f"{name}_tiny_tp1_cpu.md").read_text()
        assert "CPU run" in md and "| 3 | eager |" in md and "## Floor" in md
    qwen = json.loads((tmp_path / "qwen3.5_tiny_tp1_cpu.json").read_text())
    assert qwen["floors"]["1"]["moe_path"] == "sparse" and qwen["floors"]["1"]["experts_read"]["layers.0.mlp"] == 2


def test_time_budget_skips_and_exits_1(tmp_path):
    rc = main([*TINY, "--model", "minimax-m2.5", "--tokens", "1", "--budget-s", "0", "--out", str(tmp_path)])
    assert rc == 1
    assert not list(tmp_path.iterdir()), "a model skipped whole writes nothing"


@pytest.mark.slow
def test_cpu_run_with_compiled_variants(tmp_path):
    # One tiny model through braze (stock Inductor's path through the bench is test_dynamic_shapes_reuse_one_compile's)
    torch._dynamo.reset()
    rc = main([*TINY, "--model", "minimax-m2.5", "--tokens", "1", "--quick", "--shapes", "static",
               "--variants", "eager,braze", "--out", str(tmp_path)])
    assert rc == 0
    doc = _load(tmp_path, "minimax-m2.5_tiny_tp1_cpu")
    assert doc["meta"]["shapes"].startswith("static")
    rows = {r["variant"]: r for r in doc["rows"]}
    assert set(rows) == {"eager", "braze"}
    row = rows["braze"]
    c = row["correctness"]
    assert row["ok"] and c["finite"] and c["rel_fro"] < 5e-2 and row["compile_s"] > 0
    assert row["state"]["max_rel_err"] < 5e-2
    b = rows["braze"]["braze"]
    assert b["summary"].startswith("braze report: 1 graph(s)") and b["kernels_total"] > 0
    assert "layers.0" in b["kernels_per_layer"]
    assert "## braze report" in (tmp_path / "minimax-m2.5_tiny_tp1_cpu.md").read_text()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_tensor_parallel_under_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "braze", *TINY, "--model", "minimax-m2.5", "--tokens", "1,2",
           "--variants", "eager", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    stem = "minimax-m2.5_tiny_tp2_cpu"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.{e}" for e in ("json", "md", "png")]
    doc = _load(tmp_path, "minimax-m2.5_tiny_tp2_cpu")
    assert doc["meta"]["tp"] == 2 and doc["meta"]["command"].startswith("torchrun --nproc-per-node 2 -m braze bench")
    for r in doc["rows"]:
        assert len(r["ranks"]) == 2 and all(x["ok"] for x in r["ranks"])
        assert r["time"]["median_s"] == max(x["median_s"] for x in r["ranks"])


def test_compare_logits_fails_nan_and_shape():
    ref = torch.randn(3, 50)
    good = compare_logits(ref + 1e-4 * torch.randn(3, 50), ref, 1e-2)
    assert good["passed"] and good["top1_agree"] == 1.0 and good["rel_fro"] < 1e-3
    bad = ref.clone()
    bad[1, 7] = float("nan")
    res = compare_logits(bad, ref, 1e-2)
    assert not res["passed"] and not res["finite"] and res["rel_fro"] is None
    assert not compare_logits(ref[:2], ref, 1e-2)["passed"]
    assert not compare_logits(ref * 2, ref, 1e-2)["passed"]


def test_compare_state_floats_and_bytes():
    a, b = torch.randn(4, 8), torch.randint(0, 255, (4, 16), dtype=torch.uint8)
    b2 = b.clone()
    b2[0, :4] += 1
    res = compare_state({"a": a * 1.01, "b": b2}, {"a": a, "b": b})
    assert res["max_rel_err_buffer"] == "a" and abs(res["max_rel_err"] - 0.01) < 1e-4
    assert res["max_bytes_differing_buffer"] == "b" and res["max_bytes_differing"] == 4 / 64


def test_gpu_shaped_results_render(tmp_path):
    # What a GPU run adds (kernel counts, memory, TP ranks, a failure, a skip) renders in markdown and plot.
    main([*TINY, "--model", "minimax-m2.5", "--tokens", "1", "--variants", "eager", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "minimax-m2.5_tiny_tp1_cpu.json").read_text())
    doc["meta"].update(device="cuda", card="NVIDIA H100 80GB HBM3", matmul_bf16_TFLOPs=700.0)
    doc["model"]["variants"] = ["eager", "inductor", "braze"]
    eager = doc["rows"][0]
    eager.update(kernels={"kernels": 120, "memcpy": 2, "memset": 1, "names": {"gemv": 40, "triton_poi_fused_0": 80},
                          "time_us": {"gemv": 400.0, "triton_poi_fused_0": 160.0}, "copy_us": 3.0},
                 peak_mem_bytes=3 * 2**30, extra_mem_bytes=5 * 2**20)
    braze_row = copy.deepcopy(eager)
    braze_row.update(variant="braze", compile_s=12.5, kernels={"kernels": 80, "memcpy": 0, "memset": 0, "names": {}},
                     braze={"summary": "braze report: 1 graph(s), 2 applied, 1 missed, 0 failed", "applied": 2,
                            "missed": 1, "failed": 0, "kernels_per_layer": {"layers.0": 30, "layers.1": 30},
                            "stock_kernels_per_layer": None, "kernels_total": 60, "pass_seconds": 0.1,
                            "applied_names": ["norm-quant"], "missed_reasons": ["norm-quant: no quant consumer"]})
    braze_row["time"] = dict(eager["time"], median_s=eager["time"]["median_s"] / 2)
    doc["rows"] += [{"tokens": 1, "variant": "inductor", "ok": False, "error": "RuntimeError: boom | here\nmore"},
                    braze_row, {"tokens": 1, "variant": "braze", "skipped": "time budget of 5 s spent"}]
    md = markdown(doc)
    assert "CPU run" not in md and "| 1 | eager |" in md and "120 (2, 1)" in md and "3.00 (+5)" in md
    assert "FAILED: RuntimeError: boom / here" in md and "skipped: time budget" in md
    assert "2.00×" in md and "| 60 |" in md and "missed norm-quant: no quant consumer" in md
    assert "## Failures" in md
    # the eager row's device time by kind: 40 GEMVs and 80 Inductor kernels, 563 µs busy
    assert "## Where the time goes" in md and "| 563.0 |" in md and "400.0 (40)" in md and "160.0 (80)" in md
    assert "`gemv` 400.0 µs × 40" in md
    braze_row["timeline"] = {"span_us": 900.0, "busy_us": 860.0, "idle_us": 40.0, "overlap_us": 12.5,
                             "kernel_us": 872.5, "kernels": 80, "streams": {"7": 74, "13": 6}, "side_kernel_us": 20.0,
                             "side_hidden_us": 12.5, "longest_gaps": [[3.2, "gemv", "triton_poi_fused_0"]]}
    md = markdown(doc)
    assert "## Inside the CUDA graph" in md
    assert "| 900.0 | 860.0 | 40.0 | 12.5 | 20.0 (12.5) | 80 | 3.2 µs before `triton_poi_fused_0` |" in md
    paths = write_results(doc, tmp_path / "gpu", "fake")
    assert [p.suffix for p in paths] == [".json", ".md", ".png"] and all(p.stat().st_size for p in paths)


def test_timeline_of_kernel_records():
    from braze.bench_device import _is_sync_record, timeline_of

    us = 1000  # records are in ns
    # main stream 7: a [0, 10), b [12, 20), c [20, 30), d [35, 40); side stream 9: s1 [13, 18), s2 [28, 33)
    records = [(0, 10 * us, 7, "a"), (12 * us, 20 * us, 7, "b"), (20 * us, 30 * us, 7, "c"), (35 * us, 40 * us, 7, "d"),
               (13 * us, 18 * us, 9, "s1"), (28 * us, 33 * us, 9, "s2")]
    t = timeline_of(records[::-1])  # any order
    assert t.span_us == 40.0 and t.kernels == 6 and t.streams == {"7": 4, "9": 2}
    assert t.busy_us == 10 + 21 + 5 and t.idle_us == 40 - 36  # busy: [0,10) [12,33) [35,40)
    assert t.overlap_us == 5 + 2 and t.kernel_us == 43.0  # s1 inside b, s2 overlaps c for 2
    assert t.side_kernel_us == 10.0 and t.side_hidden_us == 7.0
    assert t.longest_gaps == [(2.0, "a", "b"), (2.0, "s2", "d")]
    assert t.records is None
    kept = timeline_of(records, keep_records=True).records
    assert kept[0] == (0.0, 10.0, "7", "a") and kept[2] == (13.0, 5.0, "9", "s1") and len(kept) == 6
    one = timeline_of([(0, 5 * us, 3, "x")])
    assert (one.span_us, one.busy_us, one.idle_us, one.overlap_us, one.side_kernel_us, one.longest_gaps) == (
        5.0, 5.0, 0.0, 0.0, 0.0, [])
    with pytest.raises(ValueError, match="no kernel records"):
        timeline_of([])
    assert _is_sync_record("Stream Wait Event") and not _is_sync_record("triton_poi_fused_sync_0")


def test_dense_moe_switches_every_moe_and_restores():
    from braze.bench_checks import dense_moe
    from braze.models import build

    m = build("deepseek-v3.2", "tiny", max_batch=1, max_context=8)
    moes = [layer.mlp for layer in m.layers[m.config.first_k_dense:]]
    assert all(moe.experts.is_sparse(1, moe.router.top_k) for moe in moes)
    with dense_moe(m):
        assert not any(moe.experts.is_sparse(1, moe.router.top_k) for moe in moes)
    assert all(moe.experts.is_sparse(1, moe.router.top_k) for moe in moes)


@pytest.mark.slow
def test_dynamic_shapes_reuse_one_compile(tmp_path):
    # T=2 and T=3 both take the sparse MoE path of the tiny model (T·2 < 8): one compile serves both.
    torch._dynamo.reset()
    rc = main([*TINY, "--model", "minimax-m2.5", "--tokens", "2,3", "--shapes", "dynamic", "--variants", "inductor",
               "--quick", "--out", str(tmp_path)])
    assert rc == 0
    doc = _load(tmp_path, "minimax-m2.5_tiny_tp1_cpu")
    first, second = doc["rows"]
    assert first["compiled_graphs"] == 1 and first["compile_s"] > 0
    assert second["compiled_graphs"] == 0 and second["compile_s"] is None and second["ok"]
    assert "dynamic T" in doc["meta"]["shapes"]


def test_braze_graphs_of_a_reused_compile():
    # With dynamic shapes a T may run on the graph an earlier T compiled: its report is that graph's.
    from types import SimpleNamespace

    from braze.bench_variants import Variants

    backend = SimpleNamespace(report=SimpleNamespace(graphs=["g0"]))
    v = Variants(model=None, shapes="dynamic")
    assert v.graphs("braze", backend, since=0) == (["g0"], False)
    assert v.graphs("braze", backend, since=1) == (["g0"], True)
    backend.report.graphs.append("g1")
    assert v.graphs("braze", backend, since=1) == (["g1"], False)


def test_router_margins_and_near_tie_verdict():
    from braze.bench_checks import NEAR_TIE, router_margins
    from braze.models import build, make_decode_inputs

    m = build("minimax-m2.5", "tiny", dtype=torch.float32, max_batch=3, max_context=16)  # E=8, top-2, sigmoid+bias
    batch = make_decode_inputs(m, 3, 6, torch.Generator().manual_seed(1))
    seen = []
    moe = m.layers[1].mlp
    handle = moe.gate.register_forward_hook(lambda mod, a, out: seen.append(out.detach()))
    with torch.no_grad(), router_margins(m) as ties:
        m(*batch)
    handle.remove()
    assert not moe.gate._forward_hooks, "router_margins removes its hooks"
    (tie,) = ties
    choice = (seen[0].sigmoid() + moe.e_score_correction_bias).sort(-1, descending=True).values
    layer1 = (choice[:, 1] - choice[:, 2]) / choice[:, 1] / NEAR_TIE[torch.float32]
    assert tie.shape == (3,) and (tie <= layer1 + 1e-5).all() and (tie > 0).all()


def test_near_tie_threshold_follows_the_activations_an_fp32_router_reads():
    # an fp32 router fed bf16 hidden states sees them move by bf16 rounding: its threshold is the bf16
    # activations' (measured, benchmarks/results/router_sensitivity_minimax-m2.5.md), not fp32's 2e-3
    from braze.bench_checks import NEAR_TIE, NEAR_TIE_INPUTS, near_tie, router_margins
    from braze.models import build, make_decode_inputs

    assert near_tie(torch.float32, torch.float32) == NEAR_TIE[torch.float32]
    assert near_tie(torch.float32, torch.bfloat16) == NEAR_TIE_INPUTS[torch.bfloat16] > NEAR_TIE[torch.float32]
    assert near_tie(torch.bfloat16, torch.bfloat16) == NEAR_TIE[torch.bfloat16]
    m = build("minimax-m2.5", "tiny", dtype=torch.bfloat16, max_batch=3, max_context=16)  # router GEMM in fp32
    batch = make_decode_inputs(m, 3, 6, torch.Generator().manual_seed(1))
    moe = m.layers[0].mlp
    assert moe.router.dtype == torch.float32
    seen = []
    handle = moe.gate.register_forward_hook(lambda mod, a, out: seen.append(out.detach()))
    with torch.no_grad(), router_margins(m) as ties:
        m(*batch)
    handle.remove()
    (tie,) = ties
    choice = (seen[0].float().sigmoid() + moe.e_score_correction_bias).sort(-1, descending=True).values
    layer0 = (choice[:, 1] - choice[:, 2]) / choice[:, 1] / NEAR_TIE_INPUTS[torch.bfloat16]
    assert (tie <= layer0 + 1e-5).all() and (tie > 0).all()


def test_verdict_tolerates_few_tokens_at_router_near_ties():
    ref = torch.randn(16, 40)
    got = ref + 1e-4 * torch.randn(16, 40)
    got[1] += ref[1].norm()
    far, tie = torch.full((16,), 5.0), torch.full((16,), 5.0)
    tie[1] = tie[2] = tie[3] = 0.5
    assert compare_logits(got, ref, 1e-2, far)["verdict"] == "mismatch"
    res = compare_logits(got, ref, 1e-2, tie)
    assert res["passed"] and res["verdict"] == "router near-tie" and res["diverged_tokens"] == [1]
    got[0] += ref[0].norm()  # a diverged token without a near-tie: fails
    assert compare_logits(got, ref, 1e-2, tie)["verdict"] == "mismatch"
    got = ref.clone()
    got[1:4] += ref[1:4].norm(dim=-1, keepdim=True)  # 3 of 16 tokens > 16/8: too many to be ties
    assert compare_logits(got, ref, 1e-2, tie)["verdict"] == "mismatch"
    one = compare_logits(ref[:1] * 2, ref[:1], 1e-2, torch.tensor([0.5]))  # T=1: the tie alone decides
    assert one["verdict"] == "router near-tie"


def test_kernel_kinds_from_names():
    from braze.bench_device import kernel_kind, kernel_time_by_kind

    names = {
        "braze_heads_g0_0123456789ab": "braze",
        "braze_allreduce_rms_w2_abc": "braze",
        "void cutlass::device_kernel<at::cuda::detail::enable_3x_kernel_for_sm9x<cutlass::gemm::kernel::"
        "GemmUniversal<cutlass::gemm::GroupProblemShape<cute::tuple<int, int, int> >": "grouped GEMM",
        "nvjet_tst_64x8_64x16_4x1_v_bz_splitK_TNT": "GEMM",
        "void splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>": "GEMM",
        "triton_tem_fused_mm_3": "GEMM",
        "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": "Inductor Triton",
        "ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "collective",
        "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t>)":
            "attention",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 32, 4>>": "attention",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": "other",
        "void at::native::sbtopk::gatherTopK<float, unsigned int, 2, false>": "other",
    }
    for name, kind in names.items():
        assert kernel_kind(name) == kind, name
    by = kernel_time_by_kind({"braze_x": 2, "triton_poi_y": 3, "gemv2T_kernel": 1},
                             {"braze_x": 5.0, "triton_poi_y": 6.0, "gemv2T_kernel": 20.0}, copy_us=1.5)
    assert by == {"braze": {"us": 5.0, "kernels": 2}, "Inductor Triton": {"us": 6.0, "kernels": 3},
                  "GEMM": {"us": 20.0, "kernels": 1}, "memcpy/memset": {"us": 1.5, "kernels": None}}


def test_warm_up_lasts_min_s_and_every_rank_agrees(monkeypatch):
    import time as _time

    from braze import bench_device

    class Graph:
        replays = 0

        def replay(self):
            self.replays += 1
            _time.sleep(0.001)

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    g = Graph()
    t0 = _time.perf_counter()
    n = bench_device.warm_up(g, 5, min_s=0.05)
    assert n == g.replays and n >= 15 and _time.perf_counter() - t0 >= 0.045
    # under TP every rank replays the count `agree` returns (the largest extra count over ranks)
    g = Graph()
    n = bench_device.warm_up(g, 5, min_s=0.0, agree=lambda extra: extra + 7)
    assert n == g.replays == 5 + 10 + 7
