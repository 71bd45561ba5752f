"""Sequence-parallel groups and the collectives the DiT's Ulysses attention runs on.

`world_size = dp x sp`: ranks `[g*sp, (g+1)*sp)` form sequence-parallel group `g` (consecutive ranks, so a
group stays inside a node where the all-to-alls are fast). The ranks of a group see the same batch
and draw the same noise (the trainer seeds and deals data by the data-parallel rank `g`); each holds
`1/sp` of every video's tokens inside the DiTs. FSDP keeps sharding the weights over all ranks.

`UlyssesComm` implements `wan.sequence_parallel.SequenceComm` (the network only sees that protocol):
differentiable all-to-all and all-gather over one group, on NCCL on CUDA and on gloo on the CPU
(both have `all_to_all_single`; the all-gather's backward, a reduce-scatter, sums after an all-to-all).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.distributed import DistInfo
from utils.errors import UserError


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Chunk `j` of dim 0 to rank `j`; chunk `i` of the result from rank `i`."""
    x = x.contiguous()  # before empty_like, which would copy a non-contiguous (e.g. permuted grad) layout
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _reduce_scatter_sum(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """`x: [size, ...]` on every rank -> the sum over ranks of their `x[my rank]`.

    Through an all-to-all: the same bytes on the wire as a reduce-scatter, and a call that gloo and
    NCCL both have under one name in every torch this project supports (the reduce-scatter tensor API
    is being renamed, and older gloo builds lack it)."""
    return _all_to_all(x, group).sum(dim=0)


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup, size: int) -> torch.Tensor:
    """`[...] -> [size, ...]` (the list API: the same call on gloo and NCCL in every supported torch)."""
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.stack(parts)


class _AllToAll(torch.autograd.Function):
    """All-to-all over dim 0; its adjoint is the same all-to-all of the gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.group), None


class _AllGather(torch.autograd.Function):
    """`[...] -> [size, ...]`; its adjoint sums every rank's gradient for this rank's part."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, size: int) -> torch.Tensor:
        ctx.group = group
        return _all_gather(x, group, size)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter_sum(grad, ctx.group), None, None


class UlyssesComm:
    """The collectives of one sequence-parallel group (`wan.sequence_parallel.SequenceComm`)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    # Outside compiled graphs (`compile: true` compiles each block): the collectives and their
    # autograd functions run eagerly between the compiled pieces.
    @torch.compiler.disable
    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.size:
            raise ValueError(f"all_to_all: dim 0 must be the group size {self.size}, got {tuple(x.shape)}")
        return _AllToAll.apply(x, self.group)

    @torch.compiler.disable
    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return _AllGather.apply(x, self.group, self.size)


@dataclass(frozen=True)
class ParallelDims:
    """Where this rank sits in `world_size = dp x sp`. `comm` is None when `sp == 1` (no sequence parallelism)."""

    dp_rank: int
    dp_size: int
    sp_rank: int
    sp_size: int
    comm: UlyssesComm | None

    @property
    def sp_leader(self) -> bool:
        """The rank of its group that writes what the group produced (inference videos)."""
        return self.sp_rank == 0


def init_sequence_parallel(sp_size: int, info: DistInfo) -> ParallelDims:
    """Split the default process group into `world_size / sp_size` groups of consecutive ranks.

    Collective: every rank calls it (each group is created on every rank, as torch requires).
    `sp_size == 1` creates nothing: data parallelism over all ranks, exactly as without this call.
    """
    if sp_size < 1 or info.world_size % sp_size != 0:
        raise UserError(
            f"sp_size={sp_size} must be >= 1 and divide the number of processes (world_size={info.world_size})"
        )
    dp_rank, sp_rank = divmod(info.rank, sp_size)
    comm = None
    if sp_size > 1:
        for g in range(info.world_size // sp_size):
            group = dist.new_group(list(range(g * sp_size, (g + 1) * sp_size)))
            if g == dp_rank:
                comm = UlyssesComm(group)
    return ParallelDims(dp_rank, info.world_size // sp_size, sp_rank, sp_size, comm)


def enable_sequence_parallel(dit: torch.nn.Module, dims: ParallelDims, what: str = "the DiT") -> None:
    """Give a Wan DiT (anything with `enable_sequence_parallel`) this rank's group; a `UserError`
    naming `what` when its heads do not split over `sp_size`."""
    if dims.comm is None:
        return
    try:
        dit.enable_sequence_parallel(dims.comm)
    except ValueError as err:
        raise UserError(f"{what}: {err}") from err


__all__ = ["ParallelDims", "UlyssesComm", "enable_sequence_parallel", "init_sequence_parallel"]
