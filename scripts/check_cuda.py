"""One-call check of the CUDA-only paths, for a machine with a GPU (CPU CI cannot run them).

    python scripts/check_cuda.py            # checks, then the 1.3B timing table
    python scripts/check_cuda.py --no_bench

1. FlexAttention (compiled BlockMask) vs the dense-mask SDPA path of the causal model, bf16, with
   the real head geometry (12 x 128) on a few layers and 1560 tokens per frame; forward and backward.
2. flash-attn (when installed) vs SDPA for unmasked attention.
3. NCCL with one process: FSDP2 sharding, mixed precision, forward/backward of a tiny generator.
4. `scripts/benchmark.py` on the 1.3B geometry with random weights, bf16.
Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch


def check_flex_vs_sdpa() -> str:
    from wan import CausalWanModel, WanConfig

    cfg = WanConfig.preset("wan2.1-t2v-1.3b").replace(num_layers=2)
    torch.manual_seed(0)
    flex = CausalWanModel(cfg, num_frame_per_block=3, attn_backend="flex").cuda().to(torch.bfloat16)
    sdpa = CausalWanModel(cfg, num_frame_per_block=3, attn_backend="sdpa").cuda().to(torch.bfloat16)
    sdpa.load_state_dict(flex.state_dict())
    x = torch.randn(1, 16, 6, 60, 104, device="cuda", dtype=torch.bfloat16)
    t = torch.rand(1, 6, device="cuda") * 1000
    ctx = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    outs = []
    for model in (flex, sdpa):
        y = model(x, t, ctx)
        y.float().square().mean().backward()
        outs.append((y.float(), model.blocks[0].self_attn.q.weight.grad.float()))
    dy = (outs[0][0] - outs[1][0]).abs().max().item() / outs[1][0].abs().max().item()
    dg = (outs[0][1] - outs[1][1]).abs().max().item() / outs[1][1].abs().max().item()
    assert dy < 2e-2 and dg < 5e-2, (dy, dg)
    return f"flex vs sdpa (bf16, 9360 tokens): rel. max diff out {dy:.2e}, grad {dg:.2e}"


def check_flash() -> str:
    from wan import attention as attn

    if attn._flash_attn_func is None:
        return "flash-attn not installed: skipped"
    q, k, v = (torch.randn(2, 4680, 12, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    a = attn._flash_attn_func(q, k, v)
    b = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    ).transpose(1, 2)
    d = (a.float() - b.float()).abs().max().item()
    assert d < 2e-2, d
    return f"flash-attn vs sdpa: max diff {d:.2e}"


def check_nccl_fsdp() -> str:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    for var, val in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(var, val)
    from utils.distributed import build_mesh, cleanup, init_distributed, shard_model
    from wan import CausalWanModel, WanConfig

    info = init_distributed()
    try:
        assert info.backend == "nccl", info.backend
        mesh = build_mesh("full", 1, 1, device_type="cuda")
        with torch.device("cuda"):
            model = CausalWanModel(
                WanConfig.preset("tiny").replace(dim=128, num_heads=1, ffn_dim=256), num_frame_per_block=2
            )
        shard_model(model, mesh, mixed_precision=True)
        x = torch.randn(1, 4, 4, 8, 8, device="cuda")
        y = model(x, torch.rand(1, 4, device="cuda") * 1000, torch.randn(1, 16, 32, device="cuda"))
        y.float().mean().backward()
        assert y.dtype == torch.bfloat16 and all(p.grad is not None for p in model.parameters())
    finally:
        cleanup()
    return "NCCL + FSDP2 mixed precision: forward/backward ok"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no_bench", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (the CPU twins run in the test suite)")
        return 0
    failed = 0
    for check in (check_flex_vs_sdpa, check_flash, check_nccl_fsdp):
        try:
            print(f"[ok]   {check()}", flush=True)
        except Exception as err:  # noqa: BLE001 - report every check, then fail
            failed += 1
            print(f"[FAIL] {check.__name__}: {type(err).__name__}: {err}", flush=True)
    if not args.no_bench:
        bench = Path(__file__).with_name("benchmark.py")
        cmd = [sys.executable, str(bench), "--geometry", "wan2.1-t2v-1.3b", "--dtype", "bf16"]
        failed += subprocess.call(cmd) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
