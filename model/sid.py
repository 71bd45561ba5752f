"""Score identity Distillation (SiD, Zhou et al. 2024) on the Self-Forcing rollout, spec §5.4.

Same rollout, timestep draw and critic as DMD; the generator loss is SiD's
`(r - f) * ((r - x) - alpha * (r - f))` (eq. 23 of the SiD paper with x0 predictions), divided by the
per-sample DMD normaliser `mean|x - r|`. Unlike DMD the score evaluations are differentiated: the
gradient reaches `x` both directly and through the noisy input `x_t` of both score networks.

Differences from upstream (which crashes before its first SiD step, spec §9.1): the gradient mask of
long rollouts is honoured, and the score networks' parameters receive no gradient from the generator
step (the vector-Jacobian product through them is taken w.r.t. `x` only, `gradient_only_through`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from utils.scheduler import FlowMatchScheduler
from wan import WanDiffusionWrapper

from .base import SelfForcingGenerator, gradient_only_through, timestep_bucket_metrics, zero_where_undefined
from .dmd import DMD

__all__ = ["SiD"]


class SiD(DMD):
    """SiD generator loss on the Self-Forcing rollout; critic as DMD.

    Args: those of `DMD` (the networks, `scheduler`, the built `rollout` and the score keywords of
    `ScoreDistillation`), plus `sid_alpha` (alpha in the loss; 1.0 upstream). Fake-score CFG is not
    part of SiD: `fake_guidance_scale` must stay 0.
    """

    def __init__(
        self,
        generator: WanDiffusionWrapper,
        real_score: WanDiffusionWrapper,
        fake_score: WanDiffusionWrapper,
        scheduler: FlowMatchScheduler,
        *,
        rollout: SelfForcingGenerator,
        sid_alpha: float = 1.0,
        **score_kwargs,
    ) -> None:
        super().__init__(generator, real_score, fake_score, scheduler, rollout=rollout, **score_kwargs)
        if self.fake_cfg_weight != 1.0:
            raise ValueError("SiD does not use critic CFG; fake_guidance_scale must be 0")
        self.sid_alpha = float(sid_alpha)

    def sid_loss(
        self,
        x: Tensor,
        t: Tensor,
        noise: Tensor,
        batch: dict[str, Tensor],
        gradient_mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """SiD loss for generated `x: [B, F, C, H, W]` at timesteps `t: [B, F]` with `noise` like `x`.

        Value: mean over the (masked) elements of `(r - f) * ((r - x) - alpha (r - f)) / mean|x - r|`
        (float64). Gradient: that of the value w.r.t. `x`, through the scores too, restricted to the
        masked elements; none reaches the score networks' parameters.
        """
        noisy = self.scheduler.add_noise(x, noise, t)
        fake = self.fake_x0(noisy, t, batch).double()
        real = self.real_x0(noisy, t, batch).double()
        xd = x.double()
        with torch.no_grad():
            normaliser = (xd - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        diff = real - fake
        elementwise = zero_where_undefined(
            diff * ((real - xd) - self.sid_alpha * diff) / normaliser, fake, real
        )
        value = elementwise.mean() if gradient_mask is None else elementwise[gradient_mask].mean()
        loss = gradient_only_through(value, x, gradient_mask)
        per_sample = elementwise.detach().mean(dim=(1, 2, 3, 4))
        metrics = {"generator_loss": value.item(), "sidtrain_score_gap": diff.detach().abs().mean().item()}
        metrics.update(timestep_bucket_metrics(per_sample, t[:, 0], self.num_train_timestep))
        return loss, metrics

    def distribution_loss(
        self, x: Tensor, t: Tensor, noise: Tensor, batch: dict[str, Tensor], gradient_mask: Tensor | None
    ) -> tuple[Tensor, dict[str, float]]:
        return self.sid_loss(x, t, noise, batch, gradient_mask)
