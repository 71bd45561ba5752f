"""The run's optimizers and LR schedules: AdamW per trained role, the GAN head's multiplier and
warm-up optimizer, one warm-up/decay schedule per role."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from utils.config import TrainConfig, lr_decay_horizon
from utils.optim import build_optimizer, build_scheduler
from wan.gan_head import gan_head_parameter_names


@dataclass
class Optimizers:
    """`optimizers`/`lr_schedulers` by role ("generator", "critic"); the GAN discriminator head's
    parameters and the optimizer that trains them alone during the warm-up (None without one)."""

    optimizers: dict[str, torch.optim.Optimizer]
    lr_schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR]
    head_params: list[nn.Parameter] = field(default_factory=list)
    warmup_optimizer: torch.optim.Optimizer | None = None

    def by_name(self) -> list[tuple[str, torch.optim.Optimizer]]:
        """Every optimizer with its checkpoint name (the warm-up one as "critic_warmup")."""
        named = list(self.optimizers.items())
        if self.warmup_optimizer is not None:
            named.append(("critic_warmup", self.warmup_optimizer))
        return named


def build_optimizers(cfg: TrainConfig, generator: nn.Module, critic: nn.Module | None) -> Optimizers:
    optimizers = {
        "generator": build_optimizer(generator.parameters(), cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    }
    head_params: list[nn.Parameter] = []
    warmup_optimizer = None
    if critic is not None:
        if cfg.trainer == "gan":  # the discriminator head trains at lr_critic x discriminator_lr_multiplier
            names = gan_head_parameter_names(critic)
            head_params = [p for n, p in critic.named_parameters() if n in names]
        optimizers["critic"] = build_optimizer(
            critic.parameters(),
            cfg.lr_critic,
            (cfg.beta1_critic, cfg.beta2_critic),
            cfg.weight_decay,
            lr_multipliers=[(head_params, cfg.discriminator_lr_multiplier)] if head_params else (),
        )
        if cfg.trainer == "gan" and cfg.discriminator_warmup_steps > 0:
            # Upstream's warm-up: only the head trains (Adam beta1 0.9), then the main optimizer
            # starts fresh; the generator waits.
            warmup_optimizer = build_optimizer(
                head_params,
                cfg.lr_critic * cfg.discriminator_lr_multiplier,
                (0.9, cfg.beta2_critic),
                cfg.weight_decay,
            )
    schedulers = {role: lr_scheduler(cfg, role, opt) for role, opt in optimizers.items()}
    return Optimizers(optimizers, schedulers, head_params, warmup_optimizer)


def lr_scheduler(
    cfg: TrainConfig, role: str, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up, then constant, a linear/cosine decay or a step down to lr_min (generator) / lr_min_critic."""
    peak, low = (cfg.lr, cfg.lr_min) if role == "generator" else (cfg.lr_critic, cfg.lr_min_critic)
    decay_steps = lr_decay_horizon(cfg.lr_decay_steps, cfg.max_steps, cfg.lr_warmup_steps, cfg.lr_decay_start)
    ratio = low / peak if peak > 0 else 1.0
    return build_scheduler(
        optimizer, cfg.lr_warmup_steps, cfg.lr_schedule, decay_steps, ratio, cfg.lr_decay_start
    )
