"""One-call check of the CUDA-only paths, for a machine with a GPU (CPU CI cannot run them).

    python scripts/check_cuda.py            # checks, then the 1.3B timing table
    python scripts/check_cuda.py --no_bench

1. FlexAttention (compiled BlockMask) vs the dense-mask SDPA path of the causal model, bf16, with
   the real head geometry (12 x 128) on a few layers and 1560 tokens per frame; forward and backward.
2. flash-attn (when installed) vs SDPA for unmasked attention.
3. NCCL with one process: FSDP2 sharding, mixed precision, forward/backward of a tiny generator.
4. Sequence parallelism over NCCL (2+ GPUs): the causal training path (flex block mask) and the
   bidirectional DiT at the 1.3B width with their tokens split over 2 GPUs against the same DiT on
   one GPU, bf16, forward and backward (`--sp_worker` under torchrun; on the CPU it runs over gloo in
   fp32, which is how the test suite checks this script).
5. `scripts/benchmark.py` on the 1.3B geometry with random weights, bf16.
Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (also by torchrun): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


def check_sequence_parallel() -> str:
    if torch.cuda.device_count() < 2:
        return "sequence parallelism needs 2+ GPUs: skipped"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, "--sp_worker"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def sp_worker() -> int:
    """Under torchrun: the DiT with its tokens split over every rank vs the same DiT on each rank alone.

    The ranks compute the same loss; the sum over ranks of a gradient must be `world_size` times the
    one-rank gradient (see wan/sequence_parallel.py). On CUDA: NCCL, bf16, the 1.3B width on 2 layers,
    flex block mask. On the CPU: gloo, fp32, the tiny preset with 9 tokens per frame (uneven shards).
    """
    import copy

    import torch.distributed as dist

    from utils.distributed import cleanup, init_distributed
    from utils.sequence_parallel import init_sequence_parallel
    from wan import CausalWanModel, WanConfig, WanModel

    info = init_distributed()
    cuda = info.device.type == "cuda"
    comm = init_sequence_parallel(info.world_size, info).comm
    if cuda:
        cfg, dtype, shape, text, tol = (
            WanConfig.preset("1.3b").replace(num_layers=2),
            torch.bfloat16,
            (6, 60, 104),
            512,
            (2e-2, 5e-2),
        )
    else:
        cfg, dtype, shape, text, tol = WanConfig.preset("tiny"), torch.float32, (6, 6, 6), 16, (1e-5, 1e-4)
    lines = []
    try:
        for name, build in (
            ("causal training path", lambda: CausalWanModel(cfg, num_frame_per_block=3)),
            ("bidirectional", lambda: WanModel(cfg)),
        ):
            torch.manual_seed(0)
            with torch.device(info.device):
                ref = build()
                torch.nn.init.normal_(ref.head.head.weight, std=0.02)  # Wan zero-inits the head
            ref = ref.to(dtype)
            split = copy.deepcopy(ref)
            split.enable_sequence_parallel(comm)
            g = torch.Generator(device=info.device).manual_seed(1)
            x = torch.randn(1, cfg.in_dim, *shape, generator=g, device=info.device, dtype=dtype)
            t = torch.rand(1, shape[0], generator=g, device=info.device) * 1000
            ctx = torch.randn(1, text, cfg.text_dim, generator=g, device=info.device, dtype=dtype)
            outs = []
            for model in (split, ref):
                y = model(x, t, ctx)
                y.float().square().mean().backward()
                outs.append(y)
            grad = split.blocks[0].self_attn.q.weight.grad.float()
            dist.all_reduce(grad)
            dy = _relative(outs[0], outs[1])
            dg = _relative(grad / info.world_size, ref.blocks[0].self_attn.q.weight.grad)
            assert dy < tol[0] and dg < tol[1], (name, dy, dg)
            lines.append(f"{name} out {dy:.1e}, grad {dg:.1e}")
        if info.rank == 0:
            print(
                f"sequence parallel over {info.backend} (sp={info.world_size}, {dtype}): rel. max diff "
                + "; ".join(lines)
            )
    finally:
        cleanup()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no_bench", action="store_true")
    p.add_argument("--sp_worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.sp_worker:
        return sp_worker()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (the CPU twins run in the test suite)")
        return 0
    failed = 0
    for check in (check_flex_vs_sdpa, check_flash, check_nccl_fsdp, check_sequence_parallel):
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
