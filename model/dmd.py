"""Distribution Matching Distillation (DMD, Yin et al. 2024; DMD2 for the two-timescale critic).

The generator is pushed along the difference of two scores of its own samples: a frozen teacher
("real score") and a critic trained online on generated samples ("fake score"), spec §5.2-§5.3.
`ScoreDistillation` holds what DMD, SiD and CausVid share (scores, CFG, timestep draw, critic loss);
subclasses decide how the generated latents are made.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from utils.scheduler import FlowMatchScheduler
from wan import WanDiffusionWrapper

from .base import (
    GeneratorOutput,
    Objective,
    ScoreTimestepSampler,
    SelfForcingGenerator,
    require,
    timestep_bucket_metrics,
    zero_where_undefined,
)

__all__ = ["DMD", "ScoreDistillation"]

DENOISING_LOSS_TYPES = ("flow", "x0")


class ScoreDistillation(Objective):
    """Shared machinery of score-based distillation (DMD, SiD, CausVid).

    Args:
        generator: the causal student, `WanDiffusionWrapper` around a `CausalWanModel` (trainable).
        real_score: the teacher, `WanDiffusionWrapper` around a `WanModel`; frozen here
            (`requires_grad_(False)`).
        fake_score: the critic, `WanDiffusionWrapper` around a `WanModel` (trainable).
        scheduler: flow-matching scheduler used to noise samples (`add_noise`).
        guidance_scale: teacher CFG in upstream's convention `cond + s * (cond - uncond)`, implemented as
            the standard `uncond + w * (cond - uncond)` with `w = 1 + guidance_scale`
            (so the shipped 3.0 is standard weight 4).
        real_guidance_scale: overrides `guidance_scale` when not None.
        fake_guidance_scale: CFG of the critic in the same convention; 0 = conditional only.
        timestep_shift, ts_schedule, ts_schedule_max, min_score_timestep: the timestep draw (§5.1).
        num_train_timestep: T; must agree with the scheduler.
        denoising_loss_type: the critic's target: "flow" (`eps - x0` vs the raw network flow) or "x0".
    """

    has_critic = True

    def __init__(
        self,
        generator: WanDiffusionWrapper,
        real_score: WanDiffusionWrapper,
        fake_score: WanDiffusionWrapper,
        scheduler: FlowMatchScheduler,
        *,
        guidance_scale: float = 3.0,
        real_guidance_scale: float | None = None,
        fake_guidance_scale: float = 0.0,
        timestep_shift: float = 5.0,
        ts_schedule: bool = False,
        ts_schedule_max: bool = False,
        min_score_timestep: int = 0,
        num_train_timestep: int | None = None,
        denoising_loss_type: str = "flow",
    ) -> None:
        super().__init__()
        if denoising_loss_type not in DENOISING_LOSS_TYPES:
            raise ValueError(
                f"denoising_loss_type must be one of {DENOISING_LOSS_TYPES}, got {denoising_loss_type!r}"
            )
        if num_train_timestep is not None and num_train_timestep != scheduler.num_train_timesteps:
            raise ValueError(
                f"num_train_timestep={num_train_timestep} disagrees with the scheduler's "
                f"num_train_timesteps={scheduler.num_train_timesteps}"
            )
        self.generator = generator
        self.real_score = real_score.requires_grad_(False).eval()
        self.fake_score = fake_score
        self.scheduler = scheduler
        self.num_train_timestep = scheduler.num_train_timesteps
        self.real_cfg_weight = 1.0 + (guidance_scale if real_guidance_scale is None else real_guidance_scale)
        self.fake_cfg_weight = 1.0 + fake_guidance_scale
        self.denoising_loss_type = denoising_loss_type
        self.timesteps = ScoreTimestepSampler(
            num_train_timestep=self.num_train_timestep,
            timestep_shift=timestep_shift,
            ts_schedule=ts_schedule,
            ts_schedule_max=ts_schedule_max,
            min_score_timestep=min_score_timestep,
        )

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "critic": self.fake_score}

    # -- how generated latents are made (rollout for DMD/SiD, noised data for CausVid) --
    def generate(self, batch: dict[str, Tensor], shared: dict[str, Any]) -> GeneratorOutput:
        raise NotImplementedError

    # -- scores --
    @staticmethod
    def _cfg(cond: Tensor, uncond: Tensor, weight: float) -> Tensor:
        return uncond + weight * (cond - uncond)

    def _x0(self, net: WanDiffusionWrapper, noisy: Tensor, t: Tensor, context: Tensor) -> Tensor:
        # Bidirectional scores take one timestep per sample.
        return net(noisy, t[:, 0], context)[1]

    def real_x0(self, noisy: Tensor, t: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Teacher x0 with CFG: `uncond + w * (cond - uncond)`; `[B, F, C, H, W]`."""
        cond = self._x0(self.real_score, noisy, t, batch["prompt_embeds"])
        if self.real_cfg_weight == 1.0:
            return cond
        neg = require(batch, "negative_prompt_embeds", type(self).__name__, ndim=3)
        return self._cfg(cond, self._x0(self.real_score, noisy, t, neg), self.real_cfg_weight)

    def fake_x0(self, noisy: Tensor, t: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Critic x0 (with CFG if `fake_guidance_scale != 0`); `[B, F, C, H, W]`."""
        cond = self._x0(self.fake_score, noisy, t, batch["prompt_embeds"])
        if self.fake_cfg_weight == 1.0:
            return cond
        neg = require(batch, "negative_prompt_embeds", type(self).__name__, ndim=3)
        return self._cfg(cond, self._x0(self.fake_score, noisy, t, neg), self.fake_cfg_weight)

    def sample_timestep(self, x: Tensor, out: GeneratorOutput | None = None) -> Tensor:
        """Score timesteps `[B, F]` float32 for latents `x` (§5.1)."""
        frm = None if out is None else out.denoised_timestep_from
        to = None if out is None else out.denoised_timestep_to
        return self.timesteps.sample(x.shape[0], x.shape[1], x.device, frm, to)

    # -- DMD generator term (§5.2) --
    def kl_gradient(self, x: Tensor, t: Tensor, noise: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """DMD gradient `g = (f - r) / mean_{F,C,H,W}|x - r|` (DMD eq. 8), float64 `[B, F, C, H, W]`.

        `x` generated latents, `t` `[B, F]` timesteps, `noise` like `x`; no gradient flows.
        """
        with torch.no_grad():
            noisy = self.scheduler.add_noise(x.detach(), noise, t)
            fake = self.fake_x0(noisy, t, batch).double()
            real = self.real_x0(noisy, t, batch).double()
            normaliser = (x.detach().double() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
            return zero_where_undefined((fake - real) / normaliser, fake, real)

    def dmd_loss(
        self,
        x: Tensor,
        t: Tensor,
        noise: Tensor,
        batch: dict[str, Tensor],
        gradient_mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """`0.5 * mean((x - stopgrad(x - g))^2)` over the (masked) elements, in float64.

        Its value is `0.5 * mean(g^2)` and its gradient w.r.t. `x` is `g / numel` (masked elements only).
        """
        g = self.kl_gradient(x, t, noise, batch)
        xd = x.double()
        target = (xd - g).detach()
        if gradient_mask is None:
            loss = 0.5 * torch.mean((xd - target) ** 2)
        else:
            loss = 0.5 * torch.mean((xd - target)[gradient_mask] ** 2)
        per_sample = 0.5 * (g**2).mean(dim=(1, 2, 3, 4))
        metrics = {"generator_loss": loss.item(), "dmdtrain_gradient_norm": g.abs().mean().item()}
        metrics.update(timestep_bucket_metrics(per_sample, t[:, 0], self.num_train_timestep))
        return loss, metrics

    def generator_loss(
        self, batch: dict[str, Tensor], shared: dict[str, Any]
    ) -> tuple[Tensor, dict[str, float]]:
        out = self.generate(batch, shared)
        x = out.latents
        t = self.sample_timestep(x, out)
        noise = torch.randn_like(x)
        return self.distribution_loss(x, t, noise, batch, out.gradient_mask)

    def distribution_loss(
        self, x: Tensor, t: Tensor, noise: Tensor, batch: dict[str, Tensor], gradient_mask: Tensor | None
    ) -> tuple[Tensor, dict[str, float]]:
        """The generator's distribution-matching term on generated `x` (DMD here; SiD overrides)."""
        return self.dmd_loss(x, t, noise, batch, gradient_mask)

    # -- critic (§5.3) --
    def denoising_loss(self, x: Tensor, t: Tensor, noise: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Critic loss on generated `x`: `mean((v - (noise - x))^2)` with the raw network flow `v`
        ("flow", spec §11: no x0 -> flow round trip) or `mean((x0 - x)^2)` ("x0"). Gradients reach the critic."""
        x = x.detach()
        noisy = self.scheduler.add_noise(x, noise, t)
        flow, x0 = self.fake_score(noisy, t[:, 0], batch["prompt_embeds"])
        if self.denoising_loss_type == "flow":
            return torch.mean((flow.float() - self.scheduler.training_target(x, noise).float()) ** 2)
        return torch.mean((x0.float() - x.float()) ** 2)

    def critic_loss(
        self, batch: dict[str, Tensor], shared: dict[str, Any]
    ) -> tuple[Tensor, dict[str, float]]:
        # A separate generator sample, made without grad (upstream: a second rollout).
        with torch.no_grad():
            out = self.generate(batch, shared)
        x = out.latents.detach()
        t = self.sample_timestep(x, out)
        noise = torch.randn_like(x)
        loss = self.denoising_loss(x, t, noise, batch)
        return loss, {"critic_loss": loss.item()}


class DMD(ScoreDistillation):
    """Self-Forcing DMD: the generated latents come from the autoregressive rollout (spec §4, §5.2).

    Args (beyond `ScoreDistillation`):
        rollout: the Self-Forcing rollout of `generator` (window, chunk layout, step list, long-rollout
            VAE), built with `SelfForcingGenerator.build(generator, scheduler, ...)`.
    """

    def __init__(
        self,
        generator: WanDiffusionWrapper,
        real_score: WanDiffusionWrapper,
        fake_score: WanDiffusionWrapper,
        scheduler: FlowMatchScheduler,
        *,
        rollout: SelfForcingGenerator,
        **score_kwargs,
    ) -> None:
        super().__init__(generator, real_score, fake_score, scheduler, **score_kwargs)
        self.rollout = rollout

    def sample_shared(self, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        return self.rollout.sample_shared(batch_size, generator)

    def generate(self, batch: dict[str, Tensor], shared: dict[str, Any]) -> GeneratorOutput:
        return self.rollout.run_generator(batch, shared)
