"""Regression onto a teacher's denoiser: how the shapes world trains its base model.

The student (here a bidirectional world network: a causal model whose one block spans the clip) sees
data latents noised to a random level, `x_t = (1 - s) x0 + s * noise`, and regresses the teacher's
flow at that point, weighted like flow matching (spec §5.8's training weight):

    loss = mean_{B,F}( w(t) * mean_{C,H,W}( (v_student(x_t, t, c) - v_teacher(x_t, t, c))^2 ) )

Unlike plain flow matching (target `noise - x0`, a noisy estimate of the teacher's flow), the target
is the teacher's conditional expectation itself, so the loss has no irreducible variance. It works
with any teacher behind the `WanDiffusionWrapper` interface; in the shapes world it is the exact
posterior mean (`world.teacher.ExactTeacher`), standing in for the pretrained Wan that upstream
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
    """

    def __init__(
        self,
        generator: WanDiffusionWrapper,
        real_score: nn.Module,
        scheduler: FlowMatchScheduler,
        *,
        num_frame_per_block: int = 3,
        independent_first_frame: bool = False,
    ) -> None:
        super().__init__(
            generator,
            scheduler,
            num_frame_per_block=num_frame_per_block,
            independent_first_frame=independent_first_frame,
        )
        self.real_score = real_score

    def generator_loss(
        self, batch: dict[str, Tensor], shared: dict[str, Any]
    ) -> tuple[Tensor, dict[str, float]]:
        clean = require(batch, "clean_latent", "TeacherRegression", ndim=5)
        b, f = clean.shape[:2]
        t = self.sample_timesteps(b, f, clean.device)
        noisy = self.scheduler.add_noise(clean, torch.randn_like(clean), t)
        with torch.no_grad():
            target, _ = self.real_score(noisy, t, batch["prompt_embeds"])
        flow, _ = self.generator(noisy, t, batch["prompt_embeds"])
        loss, per_frame = self.weighted_loss(flow, target, t)
        metrics = {"generator_loss": loss.item(), "unweighted_loss": per_frame.mean().item()}
        metrics.update(timestep_bucket_metrics(per_frame, t, self.scheduler.num_train_timesteps))
        return loss, metrics
