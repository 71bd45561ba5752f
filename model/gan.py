"""Adversarial training of the Self-Forcing generator against a Wan-critic discriminator, spec §5.5.

The discriminator is the fake-score DiT with the classification branch of `wan/gan_head.py`. Both
generated (rollout) and real (data) latents are noised to the same timestep before they are judged.
Losses are the non-saturating softplus GAN losses (Goodfellow et al. 2014), or their relativistic
pairing (Jolicoeur-Martineau 2019); R1/R2 (Mescheder et al. 2018) are approximated by finite
differences of the logits under a small input perturbation (as upstream, which avoids double
backward through the DiT).

Upstream's GAN objective crashed in several places and built an unused teacher (spec §9.4); here no
real score exists, and the generator step sends no gradient into the discriminator's parameters.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from utils.scheduler import FlowMatchScheduler
from wan import WanDiffusionWrapper
from wan.gan_head import gan_logits, has_gan_head

from .base import (
    GeneratorOutput,
    Objective,
    ScoreTimestepSampler,
    SelfForcingGenerator,
    gradient_only_through,
    require,
)

__all__ = ["GAN"]


class GAN(Objective):
    """
    Args:
        generator: causal student `WanDiffusionWrapper` (trainable).
        critic: discriminator: a `WanDiffusionWrapper` around a `WanModel` with
            `wan.gan_head.add_gan_head` applied (trainable).
        scheduler: flow-matching scheduler (noising; the rollout's re-noising).
        rollout: the Self-Forcing rollout of `generator`, built with
            `SelfForcingGenerator.build(generator, scheduler, ...)` (as for `DMD`).
        timestep_shift, critic_timestep_shift (default: timestep_shift), ts_schedule, ts_schedule_max,
        min_score_timestep: the timestep draw of spec §5.1 with the critic's shift.
        relativistic_discriminator: relativistic losses instead of the separate softplus terms.
        gan_g_weight, gan_d_weight: weights of the generator / discriminator GAN terms.
        r1_weight, r2_weight, r1_sigma, r2_sigma: finite-difference R1 (real) / R2 (fake) regularisers.
    """

    has_critic = True

    def __init__(
        self,
        generator: WanDiffusionWrapper,
        critic: WanDiffusionWrapper,
        scheduler: FlowMatchScheduler,
        *,
        rollout: SelfForcingGenerator,
        timestep_shift: float = 5.0,
        critic_timestep_shift: float | None = None,
        ts_schedule: bool = False,
        ts_schedule_max: bool = False,
        min_score_timestep: int = 0,
        relativistic_discriminator: bool = False,
        gan_g_weight: float = 1e-2,
        gan_d_weight: float = 1e-2,
        r1_weight: float = 0.0,
        r2_weight: float = 0.0,
        r1_sigma: float = 0.01,
        r2_sigma: float = 0.01,
    ) -> None:
        super().__init__()
        if not has_gan_head(critic):
            raise ValueError(
                "the GAN critic has no classification branch; apply wan.gan_head.add_gan_head(critic) first"
            )
        for name, value in (("r1_sigma", r1_sigma), ("r2_sigma", r2_sigma)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.generator = generator
        self.critic = critic
        self.scheduler = scheduler
        self.rollout = rollout
        self.timesteps = ScoreTimestepSampler(
            num_train_timestep=scheduler.num_train_timesteps,
            timestep_shift=timestep_shift if critic_timestep_shift is None else critic_timestep_shift,
            ts_schedule=ts_schedule,
            ts_schedule_max=ts_schedule_max,
            min_score_timestep=min_score_timestep,
        )
        self.relativistic = relativistic_discriminator
        self.gan_g_weight = gan_g_weight
        self.gan_d_weight = gan_d_weight
        self.r1_weight, self.r2_weight = r1_weight, r2_weight
        self.r1_sigma, self.r2_sigma = r1_sigma, r2_sigma

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "critic": self.critic}

    def sample_shared(self, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        return self.rollout.sample_shared(batch_size, generator)

    # -- pieces --
    def logits(self, noisy: Tensor, t: Tensor, context: Tensor) -> Tensor:
        """Discriminator logits `[B, num_class]` for noisy latents `[B, F, C, H, W]` at `t: [B, F]`."""
        return gan_logits(self.critic, noisy, t[:, 0], context).float()

    def _fake_and_real_logits(self, noisy_fake: Tensor, noisy_real: Tensor, t: Tensor, context: Tensor):
        # One discriminator forward on [fake; real] (prompt embeddings duplicated), as upstream.
        logits = self.logits(
            torch.cat([noisy_fake, noisy_real]), torch.cat([t, t]), torch.cat([context, context])
        )
        return logits.chunk(2)

    def _real_latent(self, batch: dict[str, Tensor], like: Tensor) -> Tensor:
        real = require(batch, "clean_latent", "GAN", ndim=5)
        if real.shape != like.shape:
            raise ValueError(
                f"batch['clean_latent'] {tuple(real.shape)} must match the generated window {tuple(like.shape)}"
            )
        return real.to(like.dtype)

    def generator_gan_loss(self, logit_fake: Tensor, logit_real: Tensor) -> Tensor:
        """`w_G * mean softplus(-l_fake)`, or relativistic `w_G * mean softplus(-(l_fake - l_real))`."""
        if self.relativistic:
            return self.gan_g_weight * F.softplus(-(logit_fake - logit_real)).mean()
        return self.gan_g_weight * F.softplus(-logit_fake).mean()

    def discriminator_gan_loss(self, logit_fake: Tensor, logit_real: Tensor) -> Tensor:
        """`w_D * (mean softplus(-l_real) + mean softplus(l_fake))`, or relativistic
        `w_D * mean softplus(-(l_real - l_fake))`."""
        if self.relativistic:
            return self.gan_d_weight * F.softplus(-(logit_real - logit_fake)).mean()
        return self.gan_d_weight * (F.softplus(-logit_real).mean() + F.softplus(logit_fake).mean())

    def finite_difference_penalty(
        self, noisy: Tensor, logit: Tensor, t: Tensor, context: Tensor, sigma: float, weight: float
    ) -> Tensor:
        """`weight * mean(((D(noisy + sigma * n) - D(noisy)) / sigma)^2)` with `n ~ N(0, I)`."""
        perturbed = noisy + sigma * torch.randn_like(noisy)
        slope = (self.logits(perturbed, t, context) - logit) / sigma
        return weight * (slope**2).mean()

    # -- losses --
    def generator_loss(
        self, batch: dict[str, Tensor], shared: dict[str, Any]
    ) -> tuple[Tensor, dict[str, float]]:
        out: GeneratorOutput = self.rollout.run_generator(batch, shared)
        x = out.latents
        real = self._real_latent(batch, x)
        t = self.timesteps.sample(
            x.shape[0], x.shape[1], x.device, out.denoised_timestep_from, out.denoised_timestep_to
        )
        noisy_fake = self.scheduler.add_noise(x, torch.randn_like(x), t)
        noisy_real = self.scheduler.add_noise(real, torch.randn_like(real), t)
        logit_fake, logit_real = self._fake_and_real_logits(noisy_fake, noisy_real, t, batch["prompt_embeds"])
        value = self.generator_gan_loss(logit_fake, logit_real)
        loss = gradient_only_through(value, x, out.gradient_mask)
        return loss, {
            "generator_loss": value.item(),
            "logit_fake": logit_fake.detach().mean().item(),
            "logit_real": logit_real.detach().mean().item(),
        }

    def critic_loss(
        self, batch: dict[str, Tensor], shared: dict[str, Any]
    ) -> tuple[Tensor, dict[str, float]]:
        with torch.no_grad():
            out = self.rollout.run_generator(batch, shared)
        x = out.latents.detach()
        real = self._real_latent(batch, x)
        t = self.timesteps.sample(
            x.shape[0], x.shape[1], x.device, out.denoised_timestep_from, out.denoised_timestep_to
        )
        noise = torch.randn_like(x)  # the same noise for fake and real (upstream)
        noisy_fake = self.scheduler.add_noise(x, noise, t)
        noisy_real = self.scheduler.add_noise(real, noise, t)
        context = batch["prompt_embeds"]
        logit_fake, logit_real = self._fake_and_real_logits(noisy_fake, noisy_real, t, context)
        gan = self.discriminator_gan_loss(logit_fake, logit_real)
        zero = gan.new_zeros(())
        r1 = (
            self.finite_difference_penalty(noisy_real, logit_real, t, context, self.r1_sigma, self.r1_weight)
            if self.r1_weight > 0
            else zero
        )
        r2 = (
            self.finite_difference_penalty(noisy_fake, logit_fake, t, context, self.r2_sigma, self.r2_weight)
            if self.r2_weight > 0
            else zero
        )
        # Upstream's trainer total: L_D + (R1 + R2) / 2.
        loss = gan + 0.5 * (r1 + r2)
        return loss, {
            "critic_loss": loss.item(),
            "gan_d_loss": gan.item(),
            "r1_loss": r1.item(),
            "r2_loss": r2.item(),
            "logit_fake": logit_fake.detach().mean().item(),
            "logit_real": logit_real.detach().mean().item(),
        }
