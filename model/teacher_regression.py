"""Regression onto a teacher's denoiser: how a domain with a closed-form teacher (the README's
shapes domain) trains its base model.

The student (there a bidirectional network: a causal model whose one block spans the clip) sees
data latents noised to a random level, `x_t = (1 - s) x0 + s * noise`, and regresses the teacher's
flow at that point, weighted like flow matching (spec §5.8's training weight):

    loss = mean_{B,F}( w(t) * mean_{C,H,W}( (v_student(x_t, t, c) - v_teacher(x_t, t, c))^2 ) )

or, with `denoising_loss_type="x0"`, on the denoised clip with equal weight at every noise level:

    loss = mean_{B,F,C,H,W}( (x0_student(x_t, t, c) - x0_teacher(x_t, t, c))^2 )

which is the flow loss weighted by sigma^2 instead of w(t) (x0 = x_t - sigma * v). With the shifted
grid most draws are very noisy, where w(t) is nearly 0: in the shapes domain the x0 loss gave far
sharper samples (README, its sweep).

Unlike plain flow matching (target `noise - x0`, a noisy estimate of the teacher's flow), the target
is the teacher's conditional expectation itself, so the loss has no irreducible variance. It works
with any teacher behind the `WanDiffusionWrapper` interface; in the shapes domain it is the exact
posterior mean (a `real_score_model` component), standing in for the pretrained Wan that upstream
initialises every role from.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from utils.scheduler import FlowMatchScheduler
from wan import WanDiffusionWrapper

from .base import require, timestep_bucket_metrics
from .diffusion import CausalDiffusion

__all__ = ["TeacherRegression"]


class TeacherRegression(CausalDiffusion):
    """
    Args:
        generator: the trained network (`WanDiffusionWrapper`).
        real_score: the frozen teacher, `(x_t, t, context) -> (flow, x0)`.
        scheduler: noise levels are drawn from its (shifted) grid, its training weight weights the loss.
        num_frame_per_block, independent_first_frame: one noise level per chunk.
        denoising_loss_type: "flow" (weighted flow MSE) or "x0" (plain x0 MSE).
    """

    def __init__(
        self,
        generator: WanDiffusionWrapper,
        real_score: nn.Module,
        scheduler: FlowMatchScheduler,
        *,
        num_frame_per_block: int = 3,
        independent_first_frame: bool = False,
        denoising_loss_type: str = "flow",
    ) -> None:
        if denoising_loss_type not in ("flow", "x0"):
            raise ValueError(f"denoising_loss_type must be 'flow' or 'x0', got {denoising_loss_type!r}")
        super().__init__(
            generator,
            scheduler,
            num_frame_per_block=num_frame_per_block,
            independent_first_frame=independent_first_frame,
        )
        self.real_score = real_score
        self.denoising_loss_type = denoising_loss_type

    def generator_loss(
        self, batch: dict[str, Tensor], shared: dict[str, Any]
    ) -> tuple[Tensor, dict[str, float]]:
        clean = require(batch, "clean_latent", "TeacherRegression", ndim=5)
        b, f = clean.shape[:2]
        t = self.sample_timesteps(b, f, clean.device)
        noisy = self.scheduler.add_noise(clean, torch.randn_like(clean), t)
        with torch.no_grad():
            target_flow, target_x0 = self.real_score(noisy, t, batch["prompt_embeds"])
        flow, x0 = self.generator(noisy, t, batch["prompt_embeds"])
        if self.denoising_loss_type == "x0":
            per_frame = ((x0.float() - target_x0.float()) ** 2).mean(dim=(2, 3, 4))
            loss = per_frame.mean()
        else:
            loss, per_frame = self.weighted_loss(flow, target_flow, t)
        metrics = {"generator_loss": loss.item(), "unweighted_loss": per_frame.mean().item()}
        metrics.update(timestep_bucket_metrics(per_frame, t, self.scheduler.num_train_timesteps))
        return loss, metrics
