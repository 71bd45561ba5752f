"""torchrun worker for tests/test_optim.py: `optim_checks.py OUT_DIR` (2 ranks, gloo, CPU).

Gradient norm, clipping and an AdamW step on an FSDP2 model against the same on an unsharded
reference fed the gathered batch.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist

from tests.dist_helpers import CheckRecorder, ToyNet
from utils.distributed import build_mesh, cleanup, init_distributed, shard_model
from utils.optim import build_optimizer, clip_grad_norm


def check_clip_and_step(info, strategy: str, gpus_per_node: int) -> None:
    torch.manual_seed(0)
    model = ToyNet()
    ref = copy.deepcopy(model)
    shard_model(
        model, build_mesh(strategy, info.world_size, gpus_per_node, device_type="cpu"), mixed_precision=False
    )
    opt = build_optimizer(model.parameters(), lr=1e-2, betas=(0.0, 0.999), weight_decay=0.01)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.0, 0.999), weight_decay=0.01)

    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(info.rank)) * 10
    (model(x).square().mean() * 5).backward()
    parts = [torch.empty_like(x) for _ in range(info.world_size)]
    dist.all_gather(parts, x)
    (sum(ref(p).square().mean() * 5 for p in parts) / info.world_size).backward()

    # Reference norm written out: sqrt of the sum of squares of every full gradient.
    expected = float(torch.sqrt(sum(p.grad.double().square().sum() for p in ref.parameters())))
    max_norm = expected / 4  # forces clipping
    norm = clip_grad_norm(model, max_norm)
    assert isinstance(norm, float)
    assert abs(norm - expected) <= 1e-5 * expected, (norm, expected)
    norms = [None] * info.world_size
    dist.all_gather_object(norms, norm)
    assert len(set(norms)) == 1, f"ranks disagree on the norm: {norms}"

    torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-7, msg=name)
    clipped = float(torch.sqrt(sum(p.grad.full_tensor().double().square().sum() for p in model.parameters())))
    assert abs(clipped - max_norm) <= 1e-4 * max_norm, (clipped, max_norm)

    opt.step()
    ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-5, atol=1e-7, msg=name)


def main() -> None:
    info = init_distributed(timeout_s=120)
    rec = CheckRecorder(sys.argv[1], info.rank)
    rec.run("clip_full", lambda: check_clip_and_step(info, "full", info.world_size))
    rec.run("clip_hybrid", lambda: check_clip_and_step(info, "hybrid", 1))
    rec.write()
    cleanup()


if __name__ == "__main__":
    main()
