"""Ulysses sequence parallelism for the Wan DiT: the token layout, given collectives from outside.

The DiT never talks to a process group. When a communicator is set (`WanBackbone.enable_sequence_parallel`,
called by the trainer with `utils.sequence_parallel.UlyssesComm`), every forward splits its video
tokens over the `size` ranks of the group (DeepSpeed-Ulysses, Jacobs et al. 2023):

* after the patch embedding each rank keeps its shard of the tokens of every frame (`TokenShards.shard`);
  the adaLN modulation, the FFN, the text cross-attention and the head are token-local and run on
  the shard as they are;
* self-attention exchanges sequence shards for head shards before attention (`to_heads`: each rank
  then holds the whole sequence for `num_heads / size` heads, so RoPE, the block mask and the KV
  cache see global token positions unchanged) and back after it (`to_tokens`);
* the head's output is gathered (`gather`), so callers get the whole prediction on every rank.

Layout: tokens are frame-major, `F` frames of `T` tokens. Rank `r` holds tokens `[r*Tp, (r+1)*Tp)` of
every frame, `Tp = ceil(T / size)`; frames are zero-padded to `size * Tp` tokens when `T` does not
divide. Shards therefore stay frame-aligned (`[B, F*Tp, dim]`: the per-frame modulation views work
unchanged, for any frame count and any block of frames), and padding tokens never enter attention
(they are cut off after `to_heads`) nor the gathered output.

Gradients: the communicator's collectives are differentiated with their exact adjoints (all-to-all
-> all-to-all, all-gather -> reduce-scatter of the sum, slicing a shard -> zero padding). The ranks of
a group compute the same loss from the same gathered outputs, so autograd across the group computes
the exact gradient of the *sum* of their `size` equal losses: each rank's parameter gradients are a
part of it, and FSDP's mean over all `dp x sp` ranks is the mean over the `dp` data-parallel replicas,
the same update as without sequence parallelism. This holds for every first-order use of gradients
(losses, `torch.autograd.grad` vector-Jacobian products); a loss built from input gradients (a
gradient penalty) would need the gradients gathered first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


class SequenceComm(Protocol):
    """Differentiable collectives of one sequence-parallel group (`utils.sequence_parallel.UlyssesComm`)."""

    size: int
    rank: int

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """`x: [size, ...]`: chunk `j` goes to rank `j`; returns `[size, ...]` whose chunk `i` came from rank `i`."""
        ...

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """`x: [...]` -> `[size, ...]`, every rank's `x` in rank order (backward: reduce-scatter of the sum)."""
        ...


def check_heads(num_heads: int, size: int) -> None:
    """Ulysses gives each rank `num_heads / size` whole heads: refuse a group size that does not divide."""
    if size < 1 or num_heads % size != 0:
        raise ValueError(
            f"sequence parallelism needs num_heads ({num_heads}) divisible by sp_size ({size}); "
            f"choose sp_size among {[d for d in range(1, num_heads + 1) if num_heads % d == 0]}"
        )


def _pad_tokens(x: torch.Tensor, total: int) -> torch.Tensor:
    """Zero-pad dim 2 (tokens of a frame) of `[B, F, T, ...]` to `total`."""
    extra = total - x.shape[2]
    if extra == 0:
        return x
    return F.pad(x, [0, 0] * (x.dim() - 3) + [0, extra])


@dataclass(frozen=True)
class TokenShards:
    """The token split of one forward call: `frames` frames of `tokens_per_frame` tokens over `comm.size` ranks.

    Local tensors are `[B, frames * local_tokens_per_frame, ...]`, whole-sequence ones
    `[B, frames * tokens_per_frame, ...]`; both frame-major.
    """

    comm: SequenceComm
    frames: int
    tokens_per_frame: int

    @property
    def size(self) -> int:
        return self.comm.size

    @property
    def local_tokens_per_frame(self) -> int:
        return -(-self.tokens_per_frame // self.size)

    def shard(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[B, F*T, C]` (the same on every rank) -> this rank's `[B, F*Tp, C]`."""
        b, _, c = tokens.shape
        tp = self.local_tokens_per_frame
        full = _pad_tokens(tokens.reshape(b, self.frames, self.tokens_per_frame, c), self.size * tp)
        return full[:, :, self.comm.rank * tp : (self.comm.rank + 1) * tp].reshape(b, -1, c)

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """This rank's `[B, F*Tp, C]` -> the whole `[B, F*T, C]` (identical on every rank)."""
        b, _, c = tokens.shape
        parts = self.comm.all_gather(tokens.contiguous())  # [size, B, F*Tp, C]
        parts = parts.view(self.size, b, self.frames, self.local_tokens_per_frame, c)
        full = parts.permute(1, 2, 0, 3, 4).reshape(b, self.frames, -1, c)
        return full[:, :, : self.tokens_per_frame].reshape(b, -1, c)

    def to_heads(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Token shards `[B, F*Tp, H, D]` -> the whole sequence for this rank's heads `[B, F*T, H/size, D]`.

        Rank `j` receives heads `[j*H/size, (j+1)*H/size)`. All tensors travel in one all-to-all.
        """
        b, _, h, d = xs[0].shape
        n, sp, tp = len(xs), self.size, self.local_tokens_per_frame
        # [sp, n, B, F, Tp, H/sp, D]: chunk j holds head group j of every tensor
        send = torch.stack(
            [x.reshape(b, self.frames, tp, sp, h // sp, d).permute(3, 0, 1, 2, 4, 5) for x in xs], dim=1
        )
        recv = self.comm.all_to_all(send)  # chunk i: rank i's tokens of every frame, my heads
        # One copy per tensor (not one stacked buffer): attention keeps v for backward, and a view
        # into a stacked buffer would keep q and k alive with it.
        outs = []
        for i in range(n):
            full = recv[:, i].permute(1, 2, 0, 3, 4, 5).reshape(b, self.frames, sp * tp, h // sp, d)
            outs.append(full[:, :, : self.tokens_per_frame].reshape(b, -1, h // sp, d))
        return tuple(outs)

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_heads` for one tensor: `[B, F*T, H/size, D]` -> `[B, F*Tp, H, D]`."""
        b, _, hs, d = x.shape
        sp, tp = self.size, self.local_tokens_per_frame
        full = _pad_tokens(x.reshape(b, self.frames, self.tokens_per_frame, hs, d), sp * tp)
        send = full.view(b, self.frames, sp, tp, hs, d).permute(2, 0, 1, 3, 4, 5)  # chunk j: rank j's tokens
        recv = self.comm.all_to_all(send.contiguous())  # chunk i: head group i of my tokens
        return recv.permute(1, 2, 3, 0, 4, 5).reshape(b, self.frames * tp, sp * hs, d)


__all__ = ["SequenceComm", "TokenShards", "check_heads"]
