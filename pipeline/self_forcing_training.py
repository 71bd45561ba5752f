"""Self-Forcing training rollout (Huang et al. 2025, "Self Forcing", Alg. 1; spec §4).

The generator produces the whole video autoregressively, block by block, exactly as at inference:
each block is denoised with the few-step schedule from pure noise while attending (through the KV
cache) to the clean outputs of the blocks before it. Each block stops at a randomly chosen "exit"
step and its x0 prediction there is the block's training output.

What is differentiated
----------------------
* Each block contributes exactly one differentiable generator evaluation: its exit step. The steps
  before it run without grad (they only produce the exit step's noisy input), and so does the
  clean-context refresh after it.
* The loss reaches the generator's parameters through that evaluation's output and through the
  block's attention to its own, freshly computed keys and values (a block is bidirectional inside).
* The cached context of earlier blocks is a constant: it is written by no-grad calls and read
  detached. No gradient flows from a block into the blocks before it, neither through the cache nor
  through the noisy inputs. Upstream's shared cache tensor leaked gradient "straight through" the
  context into earlier blocks and only trained with gradient checkpointing on (spec §2.4, §9.9); here
  training gives the same gradients with checkpointing on and off.
* Blocks that start before `gradient_from_frame` run their exit step without grad as well.

Context refresh: the cache is refreshed with `add_noise(x0, eps, context_noise)` at timestep
`context_noise`. Sigma is continuous (t/1000), so `context_noise = 0` feeds the clean x0 exactly;
upstream quantised t=0 to sigma≈0.005 (spec §9.10), a deliberate difference.

Random choices that all ranks must share (the exit steps) are drawn by `sample_exit_steps`, which the
trainer calls on rank 0 and broadcasts; this module never calls collectives.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .common import (
    allocate_caches,
    cache_context,
    causal_dit,
    check_latents,
    few_step_blocks,
    kv_capacity,
    plan_blocks,
    prepare_step_list,
    prompt_embeds_of,
)

logger = logging.getLogger(__name__)

__all__ = ["RolloutOutput", "SelfForcingTrainingPipeline"]


@dataclass
class RolloutOutput:
    """Result of `SelfForcingTrainingPipeline.inference_with_trajectory`.

    Attributes:
        latents: `[B, F_in + F, C, H, W]`: the initial latent (if any) then every block's exit-step x0;
            carries a graph only through the differentiable exit steps.
        denoised_timestep_from, denoised_timestep_to: the exit step's timestep and the next one (0 after
            the last step), converted back to un-shifted units (spec §4: exit 1 of [1000, 750, 500, 250]
            gives (750, 500)); None unless `same_step_across_blocks`.
        exit_steps: the exit step index of each generated block.
        grad_evaluations: generator evaluations that ran with grad (one per block at or after
            `gradient_from_frame`, when grad is enabled).
    """

    latents: Tensor
    denoised_timestep_from: int | None
    denoised_timestep_to: int | None
    exit_steps: list[int]
    grad_evaluations: int


class SelfForcingTrainingPipeline:
    """
    Args:
        generator: `WanDiffusionWrapper` around a `CausalWanModel`.
        scheduler: `FlowMatchScheduler` used for re-noising (and to convert timesteps back to un-shifted units).
        denoising_step_list: few-step timesteps, already warped, high to low; a trailing 0 is dropped.
        num_frame_per_block: latent frames per block (N).
        independent_first_frame: layout `[1, N, N, ...]` when no initial latent is given.
        same_step_across_blocks: one exit step for every block (and report `denoised_timestep_from/to`).
        last_step_only: always exit at the last step.
        context_noise: timestep of the clean-context refresh (noise is added at that level).
        num_max_frames: KV cache capacity of the rollout in latent frames (without a rolling window,
            longer rollouts are an error).
    """

    def __init__(
        self,
        generator: torch.nn.Module,
        scheduler,
        denoising_step_list: Tensor | Sequence[float],
        num_frame_per_block: int,
        *,
        independent_first_frame: bool = False,
        same_step_across_blocks: bool = True,
        last_step_only: bool = False,
        context_noise: float = 0.0,
        num_max_frames: int,
    ) -> None:
        model = causal_dit(generator)
        if num_frame_per_block < 1:
            raise ValueError(f"num_frame_per_block must be >= 1, got {num_frame_per_block}")
        if num_max_frames < 1:
            raise ValueError(f"num_max_frames must be >= 1, got {num_max_frames}")
        if not 0.0 <= context_noise < scheduler.num_train_timesteps:
            raise ValueError(
                f"context_noise must lie in [0, {scheduler.num_train_timesteps}), got {context_noise}"
            )
        if model.num_frame_per_block != num_frame_per_block:
            logger.warning(
                "pipeline num_frame_per_block=%d differs from the model's %d (its training-path mask)",
                num_frame_per_block,
                model.num_frame_per_block,
            )
        self.generator = generator
        self.scheduler = scheduler
        self.denoising_step_list = prepare_step_list(denoising_step_list, scheduler.num_train_timesteps)
        self.num_frame_per_block = num_frame_per_block
        self.independent_first_frame = independent_first_frame
        self.same_step_across_blocks = same_step_across_blocks
        self.last_step_only = last_step_only
        self.context_noise = float(context_noise)
        self.num_max_frames = num_max_frames

    @property
    def num_steps(self) -> int:
        return len(self.denoising_step_list)

    def block_sizes(self, num_noise_frames: int, num_initial_frames: int = 0) -> list[int]:
        """Sizes of the generated blocks for `num_noise_frames` new frames (after the initial latent)."""
        return plan_blocks(
            num_initial_frames, num_noise_frames, self.num_frame_per_block, self.independent_first_frame
        ).generated

    def sample_exit_steps(self, num_blocks: int, generator: torch.Generator | None = None) -> list[int]:
        """Exit step index in `[0, K)` per block: all `K-1` with `last_step_only`, one shared draw with
        `same_step_across_blocks`, else independent draws. Ranks must share the result (rank 0 draws)."""
        k = self.num_steps
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if self.last_step_only:
            return [k - 1] * num_blocks
        draws = 1 if self.same_step_across_blocks else num_blocks
        device = generator.device if generator is not None else "cpu"
        steps = torch.randint(0, k, (draws,), generator=generator, device=device).tolist()
        return steps * num_blocks if self.same_step_across_blocks else steps

    def _unshifted(self, t: float) -> int:
        # Inverse of the step warp t = T*S(L/T) with S(s) = shift*s / (1 + (shift-1)*s), spec §3; upstream
        # gets the same integers from its 1000-point grid (spec §4).
        big_t = self.scheduler.num_train_timesteps
        y = float(t) / big_t
        shift = self.scheduler.shift
        return int(round(big_t * y / (shift - (shift - 1.0) * y)))

    def _denoised_range(self, exit_steps: list[int]) -> tuple[int | None, int | None]:
        if not self.same_step_across_blocks:
            return None, None
        s = exit_steps[0]
        t_from = self._unshifted(self.denoising_step_list[s])
        t_to = 0 if s + 1 == self.num_steps else self._unshifted(self.denoising_step_list[s + 1])
        return t_from, t_to

    def inference_with_trajectory(
        self,
        noise: Tensor,
        conditional_dict: dict[str, Tensor],
        exit_steps: list[int] | None = None,
        initial_latent: Tensor | None = None,
        gradient_from_frame: int = 0,
        generator: torch.Generator | None = None,
    ) -> RolloutOutput:
        """Roll the generator out over `noise` (see the module docstring for what carries grad).

        Args:
            noise: `[B, F, C, H, W]` initial noise of the generated frames.
            conditional_dict: `{"prompt_embeds": [B, L, text_dim]}`.
            exit_steps: exit step index per generated block (from `sample_exit_steps`, shared across
                ranks); None draws them here from `generator`.
            initial_latent: `[B, F_in, C, H, W]` given frames (e.g. an image latent), cached at t=0.
            gradient_from_frame: blocks starting before this absolute frame (initial latent included)
                run their exit step without grad.
            generator: RNG for the fresh noise of re-noising and context refresh (global RNG if None).
        Returns:
            `RolloutOutput`.
        """
        model = causal_dit(self.generator)
        check_latents("noise", noise, model.config.in_dim)
        b, f, _, h, w = noise.shape
        embeds = prompt_embeds_of(conditional_dict, "conditional_dict", b)
        if initial_latent is not None:
            check_latents("initial_latent", initial_latent, model.config.in_dim)
            if initial_latent.shape[0] != b or initial_latent.shape[3:] != noise.shape[3:]:
                raise ValueError(
                    f"initial_latent {tuple(initial_latent.shape)} does not match noise {tuple(noise.shape)}"
                )
        f_in = 0 if initial_latent is None else initial_latent.shape[1]
        plan = plan_blocks(f_in, f, self.num_frame_per_block, self.independent_first_frame)
        if exit_steps is None:
            exit_steps = self.sample_exit_steps(len(plan.generated), generator)
        exit_steps = [int(s) for s in exit_steps]
        self._check_exit_steps(exit_steps, len(plan.generated))

        # Fresh caches per rollout: the autograd graph of this rollout reads them until backward.
        capacity = kv_capacity(model, plan.total_frames, self.num_max_frames)
        caches = allocate_caches(model, b, (h, w), capacity, noise.dtype, noise.device)
        outputs = []
        if initial_latent is not None:
            cache_context(self.generator, initial_latent, embeds, caches, plan.context, 0, 0.0)
            outputs.append(initial_latent.to(noise.dtype))
        grad_evaluations = 0
        for _, x0, with_grad in few_step_blocks(
            self.generator,
            self.scheduler,
            self.denoising_step_list,
            noise,
            embeds,
            caches,
            plan.generated,
            f_in,
            exit_steps,
            self.context_noise,
            grad_from_frame=gradient_from_frame,
            rng=generator,
        ):
            outputs.append(x0)
            grad_evaluations += int(with_grad)
        t_from, t_to = self._denoised_range(exit_steps)
        return RolloutOutput(torch.cat(outputs, dim=1), t_from, t_to, exit_steps, grad_evaluations)

    def _check_exit_steps(self, exit_steps: list[int], num_blocks: int) -> None:
        if len(exit_steps) != num_blocks:
            raise ValueError(f"exit_steps has {len(exit_steps)} entries, the rollout has {num_blocks} blocks")
        bad = [s for s in exit_steps if not 0 <= s < self.num_steps]
        if bad:
            raise ValueError(f"exit_steps {exit_steps} must lie in [0, {self.num_steps})")
        if self.same_step_across_blocks and len(set(exit_steps)) > 1:
            raise ValueError(f"same_step_across_blocks is set but exit_steps differ: {exit_steps}")
