"""torchrun worker for tests/test_distributed.py: `distributed_checks.py OUT_DIR` (2 ranks, gloo, CPU).

Every check compares the sharded run against an unsharded single-process reference computed
in the same worker on the gathered inputs of all ranks.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from torch import nn

from tests.dist_helpers import CheckRecorder, ToyNet
from utils.distributed import (
    DistInfo,
    all_reduce_mean,
    all_reduce_mean_sparse,
    apply_activation_checkpointing,
    broadcast_object,
    broadcast_tensor,
    build_mesh,
    cleanup,
    init_distributed,
    is_main_process,
    load_full_state_dict,
    raise_user_error_everywhere,
    resolve_seed,
    set_gradient_sync,
    shard_model,
)
from utils.errors import UserError

BATCH = 4


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def local_inputs(info: DistInfo, salt: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + 10 * info.rank + salt)
    return torch.randn(BATCH, 5, generator=gen)


def loss_fn(out: torch.Tensor) -> torch.Tensor:
    return out.float().square().mean()


def reference_grads(ref: nn.Module, x_local: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of mean_r loss(model(x_r)) on one process: what FSDP's averaged gradients must equal."""
    x_all = gather_rows(x_local).view(dist.get_world_size(), BATCH, -1)
    ref.zero_grad()
    loss = sum(loss_fn(ref(x_r)) for x_r in x_all) / dist.get_world_size()
    loss.backward()
    return {n: p.grad.clone() for n, p in ref.named_parameters()}


def check_grad_parity(
    info: DistInfo, strategy: str, gpus_per_node: int, expect_shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    model = ToyNet()
    ref = copy.deepcopy(model)
    mesh = build_mesh(strategy, info.world_size, gpus_per_node, device_type=info.device.type)
    assert tuple(mesh.shape) == expect_shape, (strategy, mesh.shape)
    shard_model(model, mesh, mixed_precision=False)

    x = local_inputs(info)
    out = model(x)
    torch.testing.assert_close(out, ref(x), rtol=0, atol=1e-6)
    loss_fn(out).backward()
    expected = reference_grads(ref, x)
    shard_size = mesh.shape[-1]
    shard_rank = mesh.get_local_rank(mesh.ndim - 1)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), expected[name], rtol=1e-5, atol=1e-6, msg=name)
        # FSDP2 keeps dim-0 chunk `shard_rank` of every parameter on this rank (torch.chunk rule).
        chunks = torch.chunk(dict(ref.named_parameters())[name].detach(), shard_size, dim=0)
        want = chunks[shard_rank] if shard_rank < len(chunks) else chunks[0][:0]
        assert torch.equal(p.to_local(), want), f"{name}: local shard is not dim-0 chunk {shard_rank}"


def check_init(info: DistInfo) -> None:
    assert (info.rank, info.world_size) == (dist.get_rank(), 2)
    assert info.device.type == "cpu" and info.backend == "gloo" and info.launched
    assert info.local_rank == info.rank and info.local_world_size == 2
    assert is_main_process() == (info.rank == 0)


def check_mixed_precision(info: DistInfo) -> None:
    torch.manual_seed(0)
    model = ToyNet()
    ref_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    mesh = build_mesh("full", info.world_size, info.world_size, device_type=info.device.type)
    shard_model(model, mesh, mixed_precision=True)
    x = local_inputs(info)
    out = model(x)
    assert out.dtype == torch.bfloat16, out.dtype
    assert all(b.last_dtype == torch.bfloat16 for b in model.blocks), [b.last_dtype for b in model.blocks]
    # Gathered parameters are the fp32 master weights rounded to bf16: same result as a bf16 copy.
    torch.testing.assert_close(out, ref_bf16(x))
    loss_fn(out).backward()
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, (name, p.dtype, p.grad.dtype)


def check_activation_checkpointing(info: DistInfo) -> None:
    torch.manual_seed(0)
    model = ToyNet()
    ref = copy.deepcopy(model)
    keys_before = list(model.state_dict())
    apply_activation_checkpointing(model)
    mesh = build_mesh("full", info.world_size, info.world_size, device_type=info.device.type)
    shard_model(model, mesh, mixed_precision=False)
    assert list(model.state_dict()) == keys_before, "checkpointing renamed parameters"
    x = local_inputs(info)
    loss_fn(model(x)).backward()
    # Forward once, then recomputed once in backward.
    assert [b.calls for b in model.blocks] == [2] * len(model.blocks), [b.calls for b in model.blocks]
    expected = reference_grads(ref, x)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), expected[name], rtol=1e-5, atol=1e-6, msg=name)


def check_broadcast(info: DistInfo) -> None:
    mine = {"rank": info.rank, "exit": [info.rank * 3, 1]}
    got = broadcast_object(mine, src=0)
    assert got == {"rank": 0, "exit": [0, 1]}, got
    t = torch.full((3,), float(info.rank + 7))
    broadcast_tensor(t, src=1)
    assert torch.equal(t, torch.full((3,), 8.0)), t
    means = all_reduce_mean({"a": float(info.rank), "b": 2.0 * info.rank + 1}, info.device)
    assert means == {"a": 0.5, "b": 2.0}, means
    seed = resolve_seed(0)
    seeds = [None] * info.world_size
    dist.all_gather_object(seeds, seed)
    assert seeds[0] == seeds[1] and seed != 0, seeds
    assert resolve_seed(123) == 123


def check_sparse_metric_mean(info: DistInfo) -> None:
    # Ranks report different keys (e.g. per-timestep-bucket losses): each key is the mean over the
    # ranks that report it.
    mine = {"a": 1.0, "b": 2.0} if info.rank == 0 else {"a": 3.0, "c": 5.0}
    got = all_reduce_mean_sparse(mine, info.device)
    assert got == {"a": 2.0, "b": 2.0, "c": 5.0}, got


def check_user_error_everywhere(info: DistInfo) -> None:
    # A UserError seen by rank 1 only is raised on every rank, with its message.
    error = UserError("data.mdb is truncated") if info.rank == 1 else None
    try:
        raise_user_error_everywhere(error)
    except UserError as err:
        assert str(err) == "data.mdb is truncated", err
    else:
        raise AssertionError("no error raised")
    raise_user_error_everywhere(None)  # nothing anywhere: nothing raised


class BufferedNet(ToyNet):
    """ToyNet with a non-persistent buffer that the meta path must rebuild through the hook."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.linspace(1.0, 2.0, 3), persistent=False)

    def init_non_persistent_buffers(self) -> None:
        self.scale.copy_(torch.linspace(1.0, 2.0, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


def check_meta_load(info: DistInfo) -> None:
    torch.manual_seed(1234 + info.rank)  # ranks would build different weights: only rank 0's may survive
    full = BufferedNet().state_dict() if info.rank == 0 else None
    expected = broadcast_object({k: v.clone() for k, v in full.items()} if full is not None else None)
    with torch.device("meta"):
        model = BufferedNet()
    mesh = build_mesh("full", info.world_size, info.world_size, device_type=info.device.type)
    shard_model(model, mesh, mixed_precision=False)
    load_full_state_dict(model, full, device=info.device)
    for name, value in model.state_dict().items():
        assert torch.equal(value.full_tensor(), expected[name]), name
    assert torch.equal(model.scale, torch.linspace(1.0, 2.0, 3))

    with torch.device("meta"):
        bare = nn.Module()
        bare.blocks = nn.ModuleList([nn.Linear(2, 2)])
        bare.register_buffer("table", torch.zeros(2), persistent=False)
    try:
        load_full_state_dict(bare, bare.state_dict() if info.rank == 0 else None, device=info.device)
    except ValueError as err:
        assert "table" in str(err) and "init_non_persistent_buffers" in str(err), err
    else:
        raise AssertionError("a meta non-persistent buffer without hook must be an error")


def check_gradient_sync(info: DistInfo) -> None:
    torch.manual_seed(0)
    model = ToyNet()
    ref = copy.deepcopy(model)
    mesh = build_mesh("full", info.world_size, info.world_size, device_type=info.device.type)
    shard_model(model, mesh, mixed_precision=False)
    micro = [local_inputs(info, salt=1), local_inputs(info, salt=2)]
    for i, x in enumerate(micro):
        set_gradient_sync([model, nn.Linear(1, 1)], enabled=i == len(micro) - 1)  # plain modules are skipped
        loss_fn(model(x)).backward()
        if i == 0:
            # Sync off: FSDP2 keeps the unsharded gradient to itself, no reduce-scatter happened yet.
            assert all(p.grad is None for p in model.parameters()), "gradients were reduced with sync off"
    # Reference: the same two micro-batches accumulated on one process, averaged over ranks.
    ref.zero_grad()
    for x in micro:
        x_all = gather_rows(x).view(info.world_size, BATCH, -1)
        (sum(loss_fn(ref(x_r)) for x_r in x_all) / info.world_size).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.full_tensor(), dict(ref.named_parameters())[name].grad, msg=name)


def main() -> None:
    out_dir = sys.argv[1]
    info = init_distributed(timeout_s=120)
    rec = CheckRecorder(out_dir, info.rank)
    rec.run("init", lambda: check_init(info))
    rec.run("parity_full", lambda: check_grad_parity(info, "full", 2, (2,)))
    rec.run("parity_hybrid_one_gpu_per_node", lambda: check_grad_parity(info, "hybrid_full", 1, (2, 1)))
    rec.run("parity_hybrid_one_node", lambda: check_grad_parity(info, "hybrid", 2, (1, 2)))
    rec.run("parity_no_shard", lambda: check_grad_parity(info, "no_shard", 2, (2, 1)))
    rec.run("mixed_precision", lambda: check_mixed_precision(info))
    rec.run("activation_checkpointing", lambda: check_activation_checkpointing(info))
    rec.run("broadcast", lambda: check_broadcast(info))
    rec.run("meta_load", lambda: check_meta_load(info))
    rec.run("gradient_sync", lambda: check_gradient_sync(info))
    rec.run("sparse_metric_mean", lambda: check_sparse_metric_mean(info))
    rec.run("user_error_everywhere", lambda: check_user_error_everywhere(info))
    rec.write()
    cleanup()


if __name__ == "__main__":
    main()
