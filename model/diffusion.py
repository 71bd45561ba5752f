"""Flow-matching training of the causal generator on data latents, spec §5.8.

Diffusion forcing (Chen et al. 2024): every chunk gets its own noise level, and the block-causal mask
lets each chunk see only the (noisier or cleaner) chunks before it. Teacher forcing instead shows the
model the clean sequence as context (`clean_x`), optionally lightly noised
("noise augmentation"). Loss: per-frame flow-matching MSE weighted by the scheduler's training weight.

Deliberate differences from upstream: timesteps stay float32 (upstream cast them to bf16, so
833.33 became 832; spec §9.17), and the context noise level is drawn in timestep units from
`[0, noise_augmentation_max_timestep)` (upstream indexed its descending timestep grid with that
range, which picks the *noisiest* levels, contradicting the key's name and its comment).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from utils.scheduler import FlowMatchScheduler
from wan import WanDiffusionWrapper

from .base import Objective, require, sample_per_chunk, timestep_bucket_metrics

__all__ = ["CausalDiffusion"]


class CausalDiffusion(Objective):
    """
    Args:
        generator: `WanDiffusionWrapper` around a `CausalWanModel`.
        scheduler: the generator's flow-matching scheduler: its `timesteps` grid (shifted) is what
            noise levels are drawn from, its `training_weight` weights the loss.
        num_frame_per_block, independent_first_frame: chunk layout (one noise level per chunk).
        teacher_forcing: condition on the clean sequence (`clean_x`, teacher-forcing mask).
        noise_augmentation_max_timestep: with teacher forcing, the clean context is noised per chunk to
            a timestep drawn uniformly from `[0, noise_augmentation_max_timestep)` (same noise as the
            target); 0 keeps it clean.
    """

    has_critic = False

    def __init__(
        self,
        generator: WanDiffusionWrapper,
        scheduler: FlowMatchScheduler,
        *,
        num_frame_per_block: int = 3,
        independent_first_frame: bool = False,
        teacher_forcing: bool = False,
        noise_augmentation_max_timestep: int = 0,
    ) -> None:
        super().__init__()
        if not 0 <= noise_augmentation_max_timestep <= scheduler.num_train_timesteps:
            raise ValueError(
                f"noise_augmentation_max_timestep must lie in [0, {scheduler.num_train_timesteps}], "
                f"got {noise_augmentation_max_timestep}"
            )
        if noise_augmentation_max_timestep and not teacher_forcing:
            raise ValueError("noise_augmentation_max_timestep only applies with teacher_forcing=True")
        self.generator = generator
        self.scheduler = scheduler
        self.num_frame_per_block = num_frame_per_block
        self.independent_first_frame = independent_first_frame
        self.teacher_forcing = teacher_forcing
        self.noise_augmentation_max_timestep = int(noise_augmentation_max_timestep)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator}

    def sample_timesteps(self, batch_size: int, num_frames: int, device: torch.device) -> Tensor:
        """Per-chunk timesteps `[B, F]` float32 drawn uniformly from the scheduler's training grid."""
        index = sample_per_chunk(
            0,
            len(self.scheduler.timesteps),
            batch_size,
            num_frames,
            self.num_frame_per_block,
            self.independent_first_frame,
            device,
        )
        return self.scheduler.timesteps.to(device)[index].to(torch.float32)

    def weighted_loss(self, flow: Tensor, target: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """`mean_{B,F}(training_weight(t) * mean_{C,H,W}((flow - target)^2))` and the per-frame MSE `[B, F]`."""
        per_frame = ((flow.float() - target.float()) ** 2).mean(dim=(2, 3, 4))
        weight = self.scheduler.training_weight(t).to(per_frame.device)
        return (weight * per_frame).mean(), per_frame

    def generator_loss(
        self, batch: dict[str, Tensor], shared: dict[str, Any]
    ) -> tuple[Tensor, dict[str, float]]:
        clean = require(batch, "clean_latent", "CausalDiffusion", ndim=5)
        b, f = clean.shape[:2]
        noise = torch.randn_like(clean)
        t = self.sample_timesteps(b, f, clean.device)
        noisy = self.scheduler.add_noise(clean, noise, t)
        target = self.scheduler.training_target(clean, noise)
        extra: dict[str, Tensor] = {}
        if self.teacher_forcing:
            context, aug_t = clean, torch.zeros_like(t)
            if self.noise_augmentation_max_timestep > 0:
                aug_t = sample_per_chunk(
                    0,
                    self.noise_augmentation_max_timestep,
                    b,
                    f,
                    self.num_frame_per_block,
                    self.independent_first_frame,
                    clean.device,
                ).to(torch.float32)
                context = self.scheduler.add_noise(clean, noise, aug_t)
            extra = {"clean_x": context, "aug_t": aug_t}
        flow, _ = self.generator(noisy, t, batch["prompt_embeds"], **extra)
        loss, per_frame = self.weighted_loss(flow, target, t)
        metrics = {"generator_loss": loss.item(), "unweighted_loss": per_frame.mean().item()}
        metrics.update(timestep_bucket_metrics(per_frame, t, self.scheduler.num_train_timesteps))
        return loss, metrics
