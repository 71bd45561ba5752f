"""AdamW construction, LR warm-up and decay schedules and gradient clipping that works for FSDP2 parameters."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def build_optimizer(
    params: Iterable[nn.Parameter],
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float = 1e-8,
    lr_multipliers: Iterable[tuple[Iterable[nn.Parameter], float]] = (),
) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad (upstream: generator and critic optimisers, §6.3).

    `lr_multipliers`: `(params, factor)` pairs put in their own group at `lr * factor` (upstream's
    `discriminator_lr_multiplier` for the GAN head); every other parameter gets `lr`.
    """
    special = [([p for p in ps if p.requires_grad], factor) for ps, factor in lr_multipliers]
    taken = {id(p) for ps, _ in special for p in ps}
    trainable = [p for p in params if p.requires_grad and id(p) not in taken]
    groups = [{"params": trainable, "lr": lr}] + [{"params": ps, "lr": lr * f} for ps, f in special if ps]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("build_optimizer: no parameter requires grad (is the module frozen?)")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)


class LinearWarmup:
    """LR multiplier for `torch.optim.lr_scheduler.LambdaLR`: `(step + 1) / warmup_steps`, then 1.

    `step` counts optimizer steps already taken, so the first step runs at `lr / warmup_steps` and
    step `warmup_steps - 1` at the full `lr`. `warmup_steps = 0` keeps the LR constant (upstream).
    A class rather than a lambda so the scheduler's state dict can be checkpointed.
    """

    def __init__(self, warmup_steps: int) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        if self.warmup_steps == 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)


class WarmupDecay(LinearWarmup):
    """LR multiplier: the linear warm-up, then constant; or, from optimizer step `decay_start` (default:
    the end of the warm-up; constant at 1 until then), a linear / cosine decay from 1 to `min_ratio` over
    `decay_steps` optimizer steps, then `min_ratio` (improved-diffusion anneals, SGDR's cosine); or a
    `step`: `min_ratio` from `decay_start` on (the classic LR drop once the loss has flattened).

    With `k = step - decay_start` steps into the decay and `p = min(1, k / decay_steps)`:
    linear `1 - (1 - min_ratio) p`; cosine `min_ratio + (1 - min_ratio) (1 + cos(pi p)) / 2`.
    Its fields come from the run's config at every start; a checkpoint holds only the scheduler's
    position (utils.checkpoint.SchedulerState).
    """

    def __init__(
        self,
        warmup_steps: int,
        schedule: str = "constant",
        decay_steps: int = 1,
        min_ratio: float = 0.0,
        decay_start: int | None = None,
    ) -> None:
        super().__init__(warmup_steps)
        if schedule not in ("constant", "linear", "cosine", "step"):
            raise ValueError(f"schedule must be constant, linear, cosine or step, got {schedule!r}")
        if decay_steps < 1 or not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"need decay_steps >= 1 and min_ratio in [0, 1], got {decay_steps}, {min_ratio}")
        if decay_start is not None and decay_start < warmup_steps:
            raise ValueError(f"decay_start={decay_start} falls inside the warm-up ({warmup_steps} steps)")
        self.schedule = schedule
        self.decay_steps = decay_steps
        self.min_ratio = min_ratio
        self.decay_start = warmup_steps if decay_start is None else decay_start

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps or self.schedule == "constant":
            return super().__call__(step)
        if step < self.decay_start:
            return 1.0
        if self.schedule == "step":
            return self.min_ratio
        p = min(1.0, (step - self.decay_start) / self.decay_steps)
        if self.schedule == "linear":
            return 1.0 - (1.0 - self.min_ratio) * p
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    schedule: str = "constant",
    decay_steps: int = 1,
    min_ratio: float = 0.0,
    decay_start: int | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with `WarmupDecay(...)`; call `.step()` after each optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupDecay(warmup_steps, schedule, decay_steps, min_ratio, decay_start)
    )


def apply_base_lrs(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    base_lrs: Sequence[float],
) -> None:
    """Make `base_lrs` (this run's config, one per param group) the learning rates of an optimizer
    (and its scheduler) just restored from a checkpoint, which brought back the old ones.

    A group whose base rate changed has its current rate rescaled by new/old, so a multiplicative
    schedule (warm-up, decay) continues from the same position at the new scale; unchanged groups
    are left bit for bit as restored.
    """
    if len(base_lrs) != len(optimizer.param_groups):
        raise ValueError(f"{len(base_lrs)} learning rates for {len(optimizer.param_groups)} param groups")
    for i, (group, new) in enumerate(zip(optimizer.param_groups, base_lrs)):
        old = group.get("initial_lr", group["lr"]) if scheduler is not None else group["lr"]
        if new == old:
            continue
        group["lr"] = group["lr"] * new / old if old != 0 else new
        if "initial_lr" in group:
            group["initial_lr"] = new
        if scheduler is not None:
            scheduler.base_lrs[i] = new
    if scheduler is not None:
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def apply_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """After a checkpoint load (which restores the step counter, not the multipliers: SchedulerState):
    set every group's LR to `base_lr x multiplier(step)` with this run's multipliers (e.g. the decay
    horizon of a larger `max_steps`), the expression `LambdaLR.step()` evaluates, so an unchanged
    schedule leaves each LR bit for bit as it was saved."""
    step = scheduler.last_epoch
    lrs = [base * fn(step) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def clip_grad_norm(module_or_params: nn.Module | Iterable[torch.Tensor], max_norm: float) -> float:
    """Clip gradients to a global L2 norm of `max_norm`; return the norm before clipping.

    Sharded (DTensor) gradients are reduced across ranks, so the returned python float is the norm
    of the full gradient and identical on every rank. `max_norm = inf` only measures. A non-finite
    norm is returned as is (the trainer skips such steps) and gradients are left untouched.
    """
    params = module_or_params.parameters() if isinstance(module_or_params, nn.Module) else module_or_params
    with_grad = [p for p in params if p.grad is not None]
    grads = [p.grad for p in with_grad]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    # For DTensor gradients the norm is a DTensor; full_tensor() makes it the global value on every rank.
    total = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if math.isfinite(total) and total > max_norm:
        torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, norm, foreach=True)
    return total
