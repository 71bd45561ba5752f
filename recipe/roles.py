"""The networks of a run across ranks: structure on meta everywhere, weights read by rank 0 alone and
broadcast, sharded with FSDP2 where that pays; components (`{_component_: ...}`) built as they are."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from model.build import (
    build_dit,
    build_text_encoder,
    dit_structure,
    fixed_real_score,
    lora_spec,
    set_trainable,
)
from utils.config import TrainConfig
from utils.distributed import (
    load_full_state_dict,
    raise_user_error_everywhere,
    reshard_after_forward_for,
    shard_model,
)
from utils.errors import UserError
from utils.lora import add_lora
from utils.sequence_parallel import ParallelDims, enable_sequence_parallel

from .state import micro_seed


@dataclass
class Placement:
    """Where a run's networks live: this rank, its device, the mesh, the sequence-parallel split, and
    whether the DiTs are sharded (FSDP2) at all."""

    rank: int
    device: torch.device
    mesh: DeviceMesh
    parallel: ParallelDims
    shard_dits: bool
    seed: int


def build_text_encoder_role(cfg: TrainConfig, where: Placement) -> nn.Module:
    """Frozen umT5: structure on meta everywhere, weights read by rank 0 only and broadcast, sharded
    like the DiTs (one unit per umT5 block), optionally with its parameters kept on the CPU."""
    dtype = torch.bfloat16 if cfg.mixed_precision else torch.float32
    if cfg.text_encoder is not None:  # a component: every rank builds its own, nothing to shard
        return build_text_encoder(cfg, where.device, dtype)
    with torch.device("meta"):
        encoder = build_text_encoder(cfg, torch.device("meta"), dtype, structure_only=True)
    full_sd, error = None, None
    if where.rank == 0:
        try:
            full_sd = build_text_encoder(cfg, torch.device("cpu"), dtype).state_dict()
        except (UserError, OSError) as err:
            error = err if isinstance(err, UserError) else UserError(f"text encoder: {err}")
    raise_user_error_everywhere(error)
    shard_model(
        encoder,
        where.mesh,
        block_lists=("encoder.encoder.block",),
        mixed_precision=False,
        cpu_offload=cfg.text_encoder_cpu_offload,
    )
    home = torch.device("cpu") if cfg.text_encoder_cpu_offload else where.device
    load_full_state_dict(encoder, full_sd, device=home)
    return encoder.eval()


def build_dit_role(
    cfg: TrainConfig, role: str, where: Placement, trainable: bool, gan_head: bool = False
) -> nn.Module:
    """One DiT role ready to train or to score: a `WanDiffusionWrapper` (or, for a real score given
    as a fixed-module component, that module on the device)."""
    if role == "real_score":
        fixed = fixed_real_score(cfg, where.device)
        if fixed is not None:  # e.g. closed form: no weights, nothing to shard
            return fixed
    lora = lora_spec(cfg, role) if trainable else None
    with torch.device("meta"):
        wrapper = dit_structure(cfg, role, gan_head)
        enable_sequence_parallel(wrapper.model, where.parallel, f"{role}_model")  # checks the heads
        if lora is not None:  # adapters live inside the blocks, so FSDP2 shards them with their block
            add_lora(wrapper.model, lora)
    full_sd, error = None, None
    if where.rank == 0:
        # Rank 0 alone reads the weights (64 ranks must not each read 14B weights).
        try:
            lora_seed = micro_seed(where.seed, 0, f"{role}/lora", 0)
            host = build_dit(cfg, role, seed=where.seed, gan_head=gan_head, lora=lora, lora_seed=lora_seed)
            full_sd = host.state_dict()
            del host
        except (UserError, OSError) as err:
            error = err if isinstance(err, UserError) else UserError(f"{role} weights: {err}")
    raise_user_error_everywhere(error)
    set_trainable(wrapper, cfg, role, trainable, lora)
    if where.shard_dits:
        shard_model(
            wrapper,
            where.mesh,
            block_lists=("model.blocks",),
            mixed_precision=cfg.mixed_precision,
            reshard_after_forward=reshard_after_forward_for(cfg.sharding_strategy),
        )
    load_full_state_dict(wrapper, full_sd, device=where.device)
    if cfg.compile:  # per block, after sharding (FSDP2's hooks stay outside the compiled region)
        for block in wrapper.model.blocks:
            block.compile()
    if not trainable:
        wrapper.eval()
    return wrapper
