"""scripts/benchmark.py runs on the tiny geometry and writes every row with every field."""

from __future__ import annotations

import json
import math

import torch

from scripts import benchmark

FIELDS = {
    "row",
    "median_s",
    "min_s",
    "max_s",
    "samples",
    "gflop",
    "gflops",
    "peak_mem_mb",
    "base_mem_mb",
    "note",
}


def test_benchmark_tiny_writes_every_row(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--geometry", "tiny", "--repeats", "1", "--warmup", "1", "--threads", "1", "--no-isolate"]
    benchmark.main([*argv, "--json", str(out)])
    data = json.loads(out.read_text())
    assert [r["row"] for r in data["rows"]] == [*benchmark.ROWS, *benchmark.DERIVED]
    meta = data["meta"]
    assert meta["tokens"] == 6 * 4 * 4 and meta["backends"] == {
        "attention": "sdpa",
        "block_mask": "sdpa-chunked",
    }
    assert meta["matmul_peak_gflops"] > 0
    blocks = 6 // 3
    for r in data["rows"]:
        assert set(r) == FIELDS, r["row"]
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"], r
        assert r["gflop"] > 0 and math.isclose(r["gflops"], r["gflop"] / r["median_s"], rel_tol=1e-9)
        assert r["peak_mem_mb"] >= r["base_mem_mb"] > 0
    rows = {r["row"]: r for r in data["rows"]}
    assert rows["rollout_block"]["samples"] == blocks  # one latency per streamed block
    # FLOPs follow the work: per block is the video's share, checkpointing recomputes the forward and a
    # generator + critic step does more than a critic step.
    assert rows["rollout_block"]["gflop"] * blocks == rows["rollout_video"]["gflop"]
    assert rows["train_fwd_bwd_ckpt"]["gflop"] > rows["train_fwd_bwd"]["gflop"]
    assert rows["dmd_step"]["gflop"] > rows["critic_step"]["gflop"]
    avg = rows["dmd_step_avg"]
    assert math.isclose(
        avg["median_s"], (rows["dmd_step"]["median_s"] + 4 * rows["critic_step"]["median_s"]) / 5
    )
    # --compare reads the JSON back and prints old times and the speedup for every row
    benchmark.main([*argv, "--rows", "bidirectional_forward", "--compare", str(out)])
    table = capsys.readouterr().out
    assert "speedup" in table and "matmul peak" in table and "sdpa-chunked" in table


def test_benchmark_flops_of_a_linear_match_the_formula():
    # 2 * M * N * K for a matmul, 4 * B * H * Lq * Lk * D for attention (two matmuls), CPU SDPA included.
    x = torch.randn(7, 5)
    w = torch.randn(3, 5)
    assert benchmark.count_flops(lambda: x @ w.t()) == 2 * 7 * 3 * 5
    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 9, 4)
    flops = benchmark.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k))
    assert flops == 4 * 2 * 6 * 9 * 4


def test_benchmark_isolated_row_reports_peak_rss(tmp_path):
    # A fresh process per row: its peak RSS includes at least the interpreter and torch.
    out = tmp_path / "bench.json"
    argv = ["--geometry", "tiny", "--repeats", "1", "--warmup", "1", "--threads", "1"]
    benchmark.main([*argv, "--isolate", "--rows", "bidirectional_forward", "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["row"] == "bidirectional_forward" and row["peak_mem_mb"] >= row["base_mem_mb"] > 50
