"""Exponential moving average of a (possibly FSDP2-sharded) module's parameters.

The shadow of each parameter is an fp32 tensor with the parameter's own layout: for FSDP2
parameters a DTensor with the same mesh and placements, so an update touches only the local shard
(no all-gather) and DCP reshards the EMA when a run resumes at another world size.

When to start is the trainer's decision. Upstream (spec §6.4) creates the EMA at `ema_start_step`
from the current generator weights, then updates it after every generator optimizer step with
`shadow = d * shadow + (1 - d) * param`, d = `ema_weight`. Buffers are not averaged (the Wan DiT
has none).
Only trainable parameters are averaged. Several rates (improved-diffusion keeps 0.9999 and others)
are several `EMA` objects, one checkpoint entry each (`ema_entry_names`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from utils.distributed import reshard_all


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank stores: the local shard of a DTensor (an alias, so in-place ops stick)."""
    return t.to_local() if isinstance(t, DTensor) else t


def ema_entry_names(rates: Sequence[float]) -> dict[float, str]:
    """Checkpoint entry of each EMA rate: `ema` for a single rate (the classic layout), else `ema_<rate>`."""
    if len(rates) == 1:
        return {rates[0]: "ema"}
    return {r: f"ema_{r}" for r in rates}


class EMA(Stateful):
    """fp32 moving average of a module's trainable parameters (all of them for full training, the
    adapters for LoRA: frozen weights equal their own average), keyed by parameter name."""

    def __init__(self, module: nn.Module) -> None:
        self.shadow: dict[str, torch.Tensor] = {}
        self.copy_from(module)

    @torch.no_grad()
    def copy_from(self, module: nn.Module) -> None:
        """(Re)initialise the average to the module's current weights (upstream: at ema_start_step)."""
        reshard_all(module)
        self.shadow = {
            name: p.detach().to(torch.float32, copy=True)
            for name, p in module.named_parameters()
            if p.requires_grad
        }
        if not self.shadow:
            raise ValueError(f"EMA: {type(module).__name__} has no trainable parameter to average")

    def _pairs(self, module: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        reshard_all(module)  # operate on the sharded parameters, never on a stale gathered copy
        params = {n: p for n, p in module.named_parameters() if n in self.shadow or p.requires_grad}
        if params.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - params.keys())[:5]
            extra = sorted(params.keys() - self.shadow.keys())[:5]
            raise KeyError(
                f"EMA and {type(module).__name__} disagree: missing in module {missing}, extra {extra}"
            )
        pairs = []
        for name, p in params.items():
            s = self.shadow[name]
            if isinstance(p, DTensor) != isinstance(s, DTensor) or (
                isinstance(p, DTensor) and (p.placements != s.placements or p.device_mesh != s.device_mesh)
            ):
                raise ValueError(f"EMA shadow of {name!r} is laid out differently from the parameter")
            pairs.append((name, s, p))
        return pairs

    @torch.no_grad()
    def update(self, module: nn.Module, decay: float) -> None:
        """`shadow = decay * shadow + (1 - decay) * param`, on local shards only."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        pairs = self._pairs(module)
        shadows = [_local(s) for _, s, _ in pairs]
        params = [_local(p).to(torch.float32) for _, _, p in pairs]
        torch._foreach_mul_(shadows, decay)
        torch._foreach_add_(shadows, params, alpha=1.0 - decay)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Overwrite the module's parameters with the average (cast to the parameter dtype)."""
        for _, s, p in self._pairs(module):
            _local(p).copy_(_local(s))

    @contextmanager
    def swap_into(self, module: nn.Module) -> Iterator[nn.Module]:
        """Run the block with EMA weights in `module`; the trained weights are restored afterwards."""
        reshard_all(module)
        backup = {
            name: _local(p).detach().clone() for name, p in module.named_parameters() if name in self.shadow
        }
        self.copy_to(module)
        try:
            yield module
        finally:
            reshard_all(module)
            with torch.no_grad():
                for name, p in module.named_parameters():
                    if name in backup:
                        _local(p).copy_(backup[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadows themselves (DTensors for sharded modules): DCP loads into them in place."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        if state_dict.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - state_dict.keys())[:5]
            extra = sorted(state_dict.keys() - self.shadow.keys())[:5]
            raise KeyError(f"EMA state dict mismatch: missing {missing}, unexpected {extra}")
        for name, value in state_dict.items():
            if value is not self.shadow[name]:
                self.shadow[name].copy_(value)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Gathered fp32 CPU copy of the average on rank 0 (empty on other ranks), for export.

        Collective for sharded modules: every rank must call it. Gathers one tensor at a time.
        """
        rank = dist.get_rank() if dist.is_initialized() else 0
        out = {}
        for name, s in self.shadow.items():
            full = s.full_tensor() if isinstance(s, DTensor) else s
            if rank == 0:
                out[name] = full.detach().to("cpu", copy=True)
        return out
