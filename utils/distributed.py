"""Process groups, device meshes, FSDP2 sharding and the few collectives the trainer needs.

Networks never know they are distributed: the trainer builds a module (ideally on the meta device),
then calls `apply_activation_checkpointing` (optional), `shard_model` and `load_full_state_dict`.

Without torchrun, `init_distributed` still creates a **single-process group** (an in-memory store,
no port), so the trainer, FSDP2, DCP checkpoints and EMA follow exactly one code path at any
world size, including 1.
"""

from __future__ import annotations

import gc
import logging
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from utils.errors import UserError

try:  # torch >= 2.6
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )
except ImportError:  # torch 2.5
    from torch.distributed._composable.fsdp import (  # type: ignore[no-redef]
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Upstream's strategy names map onto mesh shapes (spec §6.5).
_FULL = ("full",)
_HYBRID = ("hybrid", "hybrid_full", "hybrid_zero2")
_NO_SHARD = ("none", "no_shard")
# Largest seed upstream draws when `seed == 0`.
_RANDOM_SEED_BOUND = 10_000_000


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits. `launched` is False for the single-process group made without torchrun."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    launched: bool


def _accelerator_type() -> str | None:
    """Device type of the available accelerator ("cuda", ...) or None on a CPU-only machine."""
    accel = getattr(torch, "accelerator", None)
    if accel is not None:
        return accel.current_accelerator().type if accel.is_available() else None
    return "cuda" if torch.cuda.is_available() else None  # torch 2.5 has no torch.accelerator


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the default process group from torchrun's environment (or a 1-process group).

    NCCL on `<accelerator>:LOCAL_RANK` when an accelerator is present, else gloo on the CPU.
    TF32 matmuls are enabled on CUDA, as upstream does. Calling it again returns the same info.
    """
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))

    accel = _accelerator_type()
    if accel is not None:
        device = torch.device(accel, local_rank)
        torch.get_device_module(accel).set_device(device)
        if accel == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    backend = dist.Backend.default_device_backend_map[device.type]

    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if launched:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    info = DistInfo(rank, world_size, local_rank, local_world_size, device, backend, launched)
    if dist.get_rank() != rank or dist.get_world_size() != world_size:
        raise RuntimeError(
            f"existing process group (rank {dist.get_rank()}/{dist.get_world_size()}) disagrees with the "
            f"environment (RANK={rank}, WORLD_SIZE={world_size})"
        )
    return info


def cleanup(synchronize: bool = True) -> None:
    """Destroy the default process group if there is one (safe to call twice).

    With `synchronize`, ranks first meet at a barrier so that none tears down its connections while
    a peer still uses them (gloo aborts the peer otherwise). Pass False when leaving on an error,
    where the other ranks may never arrive.

    Drop every FSDP2 module, optimizer and DTensor first: objects that still hold the device mesh
    when the group is destroyed are freed later, during interpreter shutdown, and with gloo that
    aborts the process ("terminate called without an active exception") in about 1 run in 6.
    The `gc.collect()` here frees such objects that are already unreachable.
    """
    gc.collect()
    if dist.is_initialized():
        if synchronize and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


@contextmanager
def distributed_session(timeout_s: float = 1800.0) -> Iterator[DistInfo]:
    """`init_distributed()` for the body of a job; the group is destroyed on the way out, meeting at
    the exit barrier only after success (after an error a peer may never reach it)."""
    info = init_distributed(timeout_s)
    ok = False
    try:
        yield info
        ok = True
    finally:
        cleanup(synchronize=ok)


def is_main_process() -> bool:
    """True on global rank 0, or when no process group exists."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """`dist.barrier()` when a process group exists."""
    if dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------------------------------------
# Shared randomness
# ------------------------------------------------------------------------------------------------


def broadcast_object(obj: T, src: int = 0) -> T:
    """Return rank `src`'s `obj` on every rank (picklable objects; e.g. exit-step choices)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensor(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite `tensor` in place with rank `src`'s values and return it.

    The tensor must live on the backend's device (`DistInfo.device`) and have the same shape and
    dtype on every rank.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def all_reduce_mean(metrics: Mapping[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over ranks (for logging). Every rank must pass the same keys."""
    keys = sorted(metrics)
    if not keys:
        return {}
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return dict(zip(keys, values.tolist()))


def all_reduce_mean_sparse(metrics: Mapping[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over the ranks that report them; ranks may report different keys
    (e.g. per-timestep-bucket losses). Collective: every rank must call it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {k: float(v) for k, v in metrics.items()}
    key_sets: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(key_sets, sorted(metrics))
    keys = sorted({k for ks in key_sets for k in ks})
    if not keys:
        return {}
    values = [float(metrics.get(k, 0.0)) for k in keys] + [1.0 if k in metrics else 0.0 for k in keys]
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    sums, counts = totals[: len(keys)].tolist(), totals[len(keys) :].tolist()
    return {k: s / c for k, s, c in zip(keys, sums, counts)}


def raise_user_error_everywhere(error: BaseException | None) -> None:
    """Collective: if any rank hit a `UserError` (passed as `error`), raise one on every rank.

    Errors found by one rank only (rank 0 reads the weights) would otherwise leave the other ranks
    waiting in a collective until the connection drops, with a misleading error of their own.
    The rank that hit the error re-raises it; the others raise a `UserError` with its message.
    """
    message = None if error is None else str(error)
    if dist.is_initialized() and dist.get_world_size() > 1:
        messages: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
        message = next((m for m in messages if m is not None), None)
    if error is not None:
        raise error
    if message is not None:
        raise UserError(message)


def resolve_seed(seed: int) -> int:
    """Upstream semantics: `seed == 0` means rank 0 draws a random seed and broadcasts it."""
    if seed == 0:
        seed = random.SystemRandom().randrange(1, _RANDOM_SEED_BOUND)
        seed = broadcast_object(seed)
    return seed


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices). Call with `base_seed + rank` for per-rank noise."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_torch_rng(seed: int, device: torch.device) -> None:
    """Seed the two generators this process draws tensors from: the CPU's and `device`'s (the current
    accelerator), exactly as `torch.manual_seed` seeds them. `torch.manual_seed` also queues a lazy seed
    for every CUDA / XPU / MTIA device, formatting the Python stack each time (about 1 ms per call on
    a CPU-only machine): too slow for once per micro-batch."""
    torch.default_generator.manual_seed(seed)
    if device.type != "cpu":
        torch.get_device_module(device.type).manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# Meshes and FSDP2
# ------------------------------------------------------------------------------------------------


def build_mesh(strategy: str, world_size: int, gpus_per_node: int, *, device_type: str) -> DeviceMesh:
    """Device mesh for a sharding strategy.

    * "full": 1-D mesh over all ranks (FULL_SHARD).
    * "hybrid" / "hybrid_full" / "hybrid_zero2": 2-D mesh `(nodes, gpus_per_node)` named
      ("replicate", "shard"): shard inside a node, replicate across nodes (HYBRID_SHARD).
    * "none" / "no_shard": 2-D mesh `(world_size, 1)`: every rank holds the full parameters and
      gradients are all-reduced (NO_SHARD / DDP), still through FSDP2 so the rest of the code sees
      one parameter type (DTensor).
    `device_type` comes from `DistInfo.device.type` ("cpu" with gloo).
    """
    if dist.is_initialized() and dist.get_world_size() != world_size:
        raise ValueError(
            f"build_mesh: world_size={world_size} but the process group has {dist.get_world_size()}"
        )
    if strategy in _FULL:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    if strategy in _HYBRID:
        if gpus_per_node < 1 or world_size % gpus_per_node != 0:
            raise ValueError(
                f"sharding_strategy={strategy!r} needs world_size ({world_size}) to be a multiple of "
                f"gpus_per_node ({gpus_per_node})"
            )
        shape = (world_size // gpus_per_node, gpus_per_node)
        return init_device_mesh(device_type, shape, mesh_dim_names=("replicate", "shard"))
    if strategy in _NO_SHARD:
        return init_device_mesh(device_type, (world_size, 1), mesh_dim_names=("replicate", "shard"))
    raise ValueError(
        f"unknown sharding_strategy {strategy!r}; choose one of {[*_FULL, *_HYBRID, *_NO_SHARD]}"
    )


def reshard_after_forward_for(strategy: str) -> bool:
    """ZeRO-2 flavours keep parameters gathered between forward and backward (more memory, fewer gathers)."""
    return strategy != "hybrid_zero2"


def get_module_list(module: nn.Module, name: str) -> nn.ModuleList:
    """The `nn.ModuleList` at dotted path `name` inside `module`, or a clear error."""
    try:
        found = module.get_submodule(name)
    except AttributeError as err:
        children = [n for n, _ in module.named_children()]
        raise ValueError(f"{type(module).__name__} has no submodule {name!r} (children: {children})") from err
    if not isinstance(found, nn.ModuleList):
        raise ValueError(f"{type(module).__name__}.{name} is a {type(found).__name__}, not an nn.ModuleList")
    return found


def shard_model(
    module: nn.Module,
    mesh: DeviceMesh,
    *,
    block_lists: Sequence[str] = ("blocks",),
    mixed_precision: bool,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    cast_forward_inputs: bool = False,
) -> nn.Module:
    """Apply FSDP2 `fully_shard` to every block of the named ModuleLists, then to the root.

    One FSDP unit per transformer block bounds the all-gathered memory to one block at a time.
    With `mixed_precision`, parameters are gathered and computed in bf16 while the sharded master
    weights, gradients reductions (`reduce_dtype`) and the optimiser stay fp32, as upstream.
    Inputs are not cast by default (`cast_forward_inputs=False`, like upstream): the network casts
    what it needs, which keeps timesteps in fp32 for the sinusoidal embedding.
    Works on meta-device modules (shard first, then `load_full_state_dict`). Returns `module`,
    which now is also an `FSDPModule`.
    """
    if mixed_precision:
        mp_policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=cast_forward_inputs
        )
    else:
        mp_policy = MixedPrecisionPolicy(cast_forward_inputs=cast_forward_inputs)
    offload = CPUOffloadPolicy(pin_memory=mesh.device_type != "cpu") if cpu_offload else OffloadPolicy()
    kwargs: dict[str, Any] = dict(
        mesh=mesh, mp_policy=mp_policy, offload_policy=offload, reshard_after_forward=reshard_after_forward
    )
    for name in block_lists:
        for block in get_module_list(module, name):
            fully_shard(block, **kwargs)
    fully_shard(module, **kwargs)
    return module


def apply_activation_checkpointing(module: nn.Module, block_lists: Sequence[str] = ("blocks",)) -> None:
    """Recompute each block's activations in backward (non-reentrant), without renaming parameters.

    Uses torch's composable `checkpoint`, which hooks the block instead of wrapping it, so
    state-dict keys stay upstream's. Call before `shard_model`. Alternative: the Wan DiT's own
    `enable_gradient_checkpointing()` flag does the same from inside; use one of the two, not both.
    """
    from torch.distributed._composable import checkpoint  # private path, stable since torch 2.1

    for name in block_lists:
        for block in get_module_list(module, name):
            checkpoint(block)


def load_full_state_dict(
    module: nn.Module,
    full_state_dict: dict[str, torch.Tensor] | None,
    *,
    device: torch.device,
    strict: bool = True,
) -> None:
    """Load a full (unsharded) state dict held by rank 0 into a sharded module on every rank.

    Rank 0 passes the state dict (CPU tensors are fine), other ranks pass None: rank 0 broadcasts
    each tensor and every rank keeps its shard, so only one process reads the file. Modules built
    on the meta device are first materialised on `device`; any submodule owning non-persistent
    buffers must then define `init_non_persistent_buffers()` to recompute them (e.g. RoPE tables).
    Note: torch replaces the values of rank 0's dict with DTensors in place; do not reuse it.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and full_state_dict is None:
        raise ValueError("load_full_state_dict: rank 0 must pass the full state dict")
    _materialize_meta(module, device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
    set_model_state_dict(module, full_state_dict if rank == 0 else {}, options=options)


def _materialize_meta(module: nn.Module, device: torch.device) -> None:
    tensors = [*module.parameters(), *module.buffers()]
    if not any(t.is_meta for t in tensors):
        return
    persistent = set(module.state_dict().keys())
    volatile = [name for name, buf in module.named_buffers() if buf.is_meta and name not in persistent]
    owners = {name.rpartition(".")[0] for name in volatile}
    missing = [
        o or "<root>" for o in owners if not hasattr(module.get_submodule(o), "init_non_persistent_buffers")
    ]
    if missing:
        raise ValueError(
            f"non-persistent buffers {volatile} are on the meta device and modules {missing} define no "
            "init_non_persistent_buffers() to rebuild them; build those modules off meta or add the hook"
        )
    module.to_empty(device=device)
    for owner in sorted(owners):
        module.get_submodule(owner).init_non_persistent_buffers()


def reshard_all(module: nn.Module) -> None:
    """Put every FSDP2 unit inside `module` back into its sharded state.

    After a no-grad forward with `reshard_after_forward=False` the gathered parameters stay
    registered; code that edits the sharded parameters in place (EMA swaps, checkpoint loads) calls
    this first so that it edits, and the next forward gathers, the real weights. No-op otherwise.
    """
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


def set_gradient_sync(modules: Iterable[nn.Module], enabled: bool) -> None:
    """Turn FSDP2 gradient reduce-scatter on/off (off on all but the last accumulation micro-batch).

    Modules that are not FSDP-sharded are skipped.
    """
    for module in modules:
        if isinstance(module, FSDPModule):
            module.set_requires_gradient_sync(enabled)
