"""ODE-trajectory regression (CausVid §4.3 initialisation), spec §5.6.

Each training sample is a teacher ODE trajectory `ode_latent [B, K+1, F, C, H, W]` ordered from noise
to clean and aligned with `denoising_step_list` (K+1 entries, the last one 0). Per chunk a random
trajectory point is chosen; the causal generator sees the resulting mixed-noise sequence in one
block-causal training-path forward and regresses its x0 prediction onto the clean end point.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from wan import WanDiffusionWrapper

from .base import Objective, require, sample_per_chunk, timestep_bucket_metrics

__all__ = ["ODERegression"]


class ODERegression(Objective):
    """
    Args:
        generator: `WanDiffusionWrapper` around a `CausalWanModel`.
        denoising_step_list: timesteps of the stored trajectory points (already warped), high to low,
            ending with 0 (the clean latent), e.g. `[1000, 960, 888.9, 727.3, 0]`.
        num_frame_per_block, independent_first_frame: chunk layout (one trajectory point per chunk).
        i2v: frame 0 is the conditioning image: always take it from the clean end of the trajectory.
        num_train_timestep: T, for the per-timestep loss metrics.
    """

    has_critic = False

    def __init__(
        self,
        generator: WanDiffusionWrapper,
        *,
        denoising_step_list: Sequence[float],
        num_frame_per_block: int = 3,
        independent_first_frame: bool = False,
        i2v: bool = False,
        num_train_timestep: int = 1000,
    ) -> None:
        super().__init__()
        steps = torch.as_tensor(list(denoising_step_list), dtype=torch.float32)
        if steps.numel() < 2 or steps[-1] != 0:
            raise ValueError(
                f"ODE regression needs denoising_step_list to end with 0 (the clean trajectory point); got {steps.tolist()}"
            )
        self.generator = generator
        self.register_buffer("denoising_step_list", steps, persistent=False)
        self.num_frame_per_block = num_frame_per_block
        self.independent_first_frame = independent_first_frame
        self.i2v = i2v
        self.num_train_timestep = num_train_timestep

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator}

    def generator_loss(
        self, batch: dict[str, Tensor], shared: dict[str, Any]
    ) -> tuple[Tensor, dict[str, float]]:
        ode = require(batch, "ode_latent", "ODERegression", ndim=6)
        b, points, f = ode.shape[:3]
        steps = self.denoising_step_list.to(ode.device)
        if points != len(steps):
            raise ValueError(
                f"batch['ode_latent'] {tuple(ode.shape)} has {points} trajectory points; denoising_step_list has "
                f"{len(steps)} entries ({steps.tolist()}); they must match one to one"
            )
        # 1. one trajectory point per chunk
        index = sample_per_chunk(
            0, points, b, f, self.num_frame_per_block, self.independent_first_frame, ode.device
        )
        if self.i2v:
            index[:, 0] = points - 1
        frames = torch.arange(f, device=ode.device)
        noisy = ode[torch.arange(b, device=ode.device)[:, None], index, frames[None, :]]  # [B, F, C, H, W]
        t = steps[index]  # [B, F]
        clean = ode[:, -1]
        # 2. one block-causal forward, x0 regressed onto the clean latent where there was noise
        _, x0 = self.generator(noisy, t, batch["prompt_embeds"])
        noisy_frames = t != 0
        per_frame = ((x0.float() - clean.float()) ** 2).mean(dim=(2, 3, 4))  # [B, F]
        if noisy_frames.any():
            loss = per_frame[noisy_frames].mean()
        else:
            loss = (x0.float() * 0).sum()  # nothing to regress this step; keep the graph
        metrics = {"generator_loss": loss.item()}
        metrics.update(
            timestep_bucket_metrics(per_frame[noisy_frames], t[noisy_frames], self.num_train_timestep)
        )
        return loss, metrics
