"""scripts/benchmark.py runs on the tiny geometry and writes every row with every field."""

from __future__ import annotations

import json
import math

import pytest
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


def test_config_mode_times_the_trainer_step_against_a_bare_loop(tmp_path, capsys):
    out = tmp_path / "steps.json"
    argv = ["--config", "configs/tiny_dmd.yaml", "--repeats", "2", "--warmup", "1", "--threads", "1"]
    rows = benchmark.main([*argv, "--json", str(out)])
    assert [r["row"] for r in rows] == ["trainer", "bare"]
    data = json.loads(out.read_text())
    # whole generator + critic cycles (tiny_dmd: dfake_gen_update_ratio 2), one process: no FSDP
    assert data["meta"]["steps_per_cycle"] == 2 and data["meta"]["fsdp"] is False
    for r in data["rows"].values():
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"] and r["cpu_median_s"] > 0
        assert r["faults_per_step"] >= 0
    trainer, bare = data["rows"]["trainer"], data["rows"]["bare"]
    assert math.isclose(data["ratio"], trainer["median_s"] / bare["median_s"])
    assert math.isclose(data["cpu_ratio"], trainer["cpu_median_s"] / bare["cpu_median_s"])
    assert "ratio trainer/bare" in capsys.readouterr().out


def test_bare_loop_builds_the_trainers_networks(tmp_path):
    """The bare loop's networks come from the same builders: the same weights as the trainer's."""
    from scripts._step_benchmark import BareLoop
    from train import Trainer
    from utils.config import load_config

    cfg = load_config("configs/tiny_dmd.yaml", ["wandb_mode=disabled", "sample_every=0"])
    trainer = Trainer(cfg, tmp_path, no_save=True, no_visualize=True)
    try:
        trainer.setup()
        bare = BareLoop(cfg, trainer, [trainer._next_batch()])
        for mine, theirs in ((bare.generator, trainer.generator), (bare.critic, trainer.critic)):
            want = theirs.state_dict()
            got = mine.state_dict()
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) for k in want)
            assert [p.requires_grad for p in mine.parameters()] == [
                p.requires_grad for p in theirs.parameters()
            ]
        bare.step(0)  # a generator + critic step runs and moves the generator
        assert any(
            not torch.equal(p, trainer.generator.state_dict()[k])
            for k, p in bare.generator.state_dict().items()
        )
    finally:
        trainer.cleanup()


def test_overrides_need_a_config():
    with pytest.raises(SystemExit):
        benchmark.parse_args(["max_steps=3"])
