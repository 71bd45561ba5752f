"""Many-step causal sampling with classifier-free guidance (spec §8.3), for causal diffusion models
(e.g. a teacher-forcing-trained generator before distillation).

Per block: a fresh multistep solver runs `num_inference_steps` steps from the block's noise, each step
evaluating the generator on the positive prompt and (unless `guidance_scale == 1`) on the negative
prompt, combined as `uncond + g * (cond - uncond)` (the standard CFG form, as upstream's pipeline).
The two prompts keep separate KV and cross-attention caches; after a block both are refreshed with
its clean result at t=0 (skipped after the last block).

Solvers: diffusers' `UniPCMultistepScheduler` in its flow-matching configuration
(`prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift`), as upstream; or a
plain Euler loop on the same shifted sigma grid (`FlowMatchScheduler`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from utils.scheduler import FlowMatchScheduler

from .common import (
    BlockOutput,
    CachePool,
    Caches,
    InferenceOutput,
    block_timesteps,
    cache_context,
    causal_dit,
    check_latents,
    kv_capacity,
    plan_blocks,
    prompt_embeds_of,
    timed_blocks,
)

__all__ = ["CausalDiffusionInferencePipeline"]

SAMPLERS = ("unipc", "euler")


class _Euler:
    """Euler on `dx/dsigma = v` over `FlowMatchScheduler.inference_timesteps`, ending at sigma = 0."""

    def __init__(self, shift: float, num_steps: int, num_train_timesteps: int, device: torch.device) -> None:
        self._sched = FlowMatchScheduler(shift=shift, num_train_timesteps=num_train_timesteps)
        self.timesteps = self._sched.inference_timesteps(num_steps).to(device)
        self._next = torch.cat([self.timesteps[1:], self.timesteps.new_zeros(1)])
        self._i = 0

    def step(self, flow: Tensor, t: Tensor, x: Tensor) -> Tensor:
        x = self._sched.step(flow, t, x, self._next[self._i])
        self._i += 1
        return x


class _UniPC:
    """A fresh diffusers UniPC solver (state is per block)."""

    def __init__(self, shift: float, num_steps: int, num_train_timesteps: int, device: torch.device) -> None:
        # diffusers takes seconds to import: only this solver needs it
        from diffusers import UniPCMultistepScheduler

        self._sched = UniPCMultistepScheduler(
            num_train_timesteps=num_train_timesteps,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
        )
        self._sched.set_timesteps(num_steps, device=device)
        self.timesteps = self._sched.timesteps

    def step(self, flow: Tensor, t: Tensor, x: Tensor) -> Tensor:
        return self._sched.step(flow, t, x, return_dict=False)[0]


class CausalDiffusionInferencePipeline:
    """
    Args:
        generator: `WanDiffusionWrapper` around a `CausalWanModel`.
        scheduler_shift: SD3 shift of the sampling grid (the model's `timestep_shift`).
        num_inference_steps: solver steps per block.
        guidance_scale: CFG scale g in `uncond + g * (cond - uncond)`; 1 skips the negative prompt.
        num_frame_per_block: latent frames per block (N).
        independent_first_frame: layout `[1, N, N, ...]` when no initial latent is given.
        sampler: "unipc" (default, upstream's) or "euler".
        num_train_timesteps: T of the timestep scale.
        vae: optional `WanVAE` for pixels.
        num_max_frames: KV cache capacity without a rolling window (None: sized to each video).
    """

    def __init__(
        self,
        generator: torch.nn.Module,
        scheduler_shift: float,
        num_inference_steps: int = 50,
        *,
        guidance_scale: float,
        num_frame_per_block: int,
        independent_first_frame: bool = False,
        sampler: str = "unipc",
        num_train_timesteps: int = 1000,
        vae=None,
        num_max_frames: int | None = None,
    ) -> None:
        causal_dit(generator)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if num_frame_per_block < 1:
            raise ValueError(f"num_frame_per_block must be >= 1, got {num_frame_per_block}")
        self.generator = generator
        self.scheduler_shift = float(scheduler_shift)
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = float(guidance_scale)
        self.num_frame_per_block = num_frame_per_block
        self.independent_first_frame = independent_first_frame
        self.sampler = sampler
        self.num_train_timesteps = num_train_timesteps
        self.vae = vae
        self.num_max_frames = num_max_frames
        self._pos_caches = CachePool()
        self._neg_caches = CachePool()

    @property
    def uses_negative_prompt(self) -> bool:
        return self.guidance_scale != 1.0

    @torch.no_grad()
    def inference(
        self,
        noise: Tensor,
        conditional_dict: dict[str, Tensor],
        unconditional_dict: dict[str, Tensor] | None = None,
        initial_latent: Tensor | None = None,
    ) -> InferenceOutput:
        """Generate a whole video.

        Args:
            noise: `[B, F, C, H, W]`.
            conditional_dict / unconditional_dict: `{"prompt_embeds": [B, L, text_dim]}` for the prompt and
                the negative prompt (the latter needed unless `guidance_scale == 1`).
            initial_latent: `[B, F_in, C, H, W]` given first frames, cached at t=0.
        Returns:
            `InferenceOutput(latents [B, F_in + F, C, H, W], videos or None)`.
        """
        blocks = self._blocks(noise, conditional_dict, unconditional_dict, initial_latent)
        latents = torch.cat([x for _, x in blocks], dim=1)
        return InferenceOutput(latents, self.vae.decode(latents) if self.vae is not None else None)

    @torch.no_grad()
    def stream(
        self,
        noise: Tensor,
        conditional_dict: dict[str, Tensor],
        unconditional_dict: dict[str, Tensor] | None = None,
        initial_latent: Tensor | None = None,
    ) -> Iterator[BlockOutput]:
        """Yield each block as soon as it is sampled (decoded with the streaming VAE decoder if set)."""
        decoder = self.vae.stream_decoder() if self.vae is not None else None
        blocks = self._blocks(noise, conditional_dict, unconditional_dict, initial_latent)
        yield from timed_blocks(blocks, decoder)

    def _solver(self, device: torch.device):
        cls = _UniPC if self.sampler == "unipc" else _Euler
        return cls(self.scheduler_shift, self.num_inference_steps, self.num_train_timesteps, device)

    def _blocks(
        self,
        noise: Tensor,
        conditional_dict: dict[str, Tensor],
        unconditional_dict: dict[str, Tensor] | None,
        initial_latent: Tensor | None,
    ) -> Iterator[tuple[int, Tensor]]:
        model = causal_dit(self.generator)
        check_latents("noise", noise, model.config.in_dim)
        b, f, _, h, w = noise.shape
        prompts = [prompt_embeds_of(conditional_dict, "conditional_dict", b)]
        if self.uses_negative_prompt:
            if unconditional_dict is None:
                raise ValueError(
                    f"guidance_scale={self.guidance_scale} needs an unconditional_dict (negative prompt)"
                )
            prompts.append(prompt_embeds_of(unconditional_dict, "unconditional_dict", b))
        f_in = 0
        if initial_latent is not None:
            check_latents("initial_latent", initial_latent, model.config.in_dim)
            f_in = initial_latent.shape[1]
        plan = plan_blocks(f_in, f, self.num_frame_per_block, self.independent_first_frame)
        capacity = kv_capacity(model, plan.total_frames, self.num_max_frames)
        pools = (self._pos_caches, self._neg_caches)[: len(prompts)]
        caches = [pool.get(model, b, (h, w), capacity, noise.dtype, noise.device) for pool in pools]
        if initial_latent is not None:
            initial_latent = initial_latent.to(noise.dtype)
            for embeds, cache in zip(prompts, caches, strict=True):
                cache_context(self.generator, initial_latent, embeds, cache, plan.context, 0, 0.0)
            yield 0, initial_latent
        pos, offset = f_in, 0
        for i, size in enumerate(plan.generated):
            x = self._sample_block(noise[:, offset : offset + size], prompts, caches, pos)
            yield pos, x
            if i + 1 < len(plan.generated):
                for embeds, cache in zip(prompts, caches, strict=True):
                    cache_context(self.generator, x, embeds, cache, [size], pos, 0.0)
            pos, offset = pos + size, offset + size

    def _sample_block(self, x: Tensor, prompts: list[Tensor], caches: list[Caches], pos: int) -> Tensor:
        solver = self._solver(x.device)
        for t in solver.timesteps:
            flows = [
                self.generator(
                    x,
                    block_timesteps(x, t),
                    embeds,
                    kv_cache=cache.kv,
                    crossattn_cache=cache.xattn,
                    current_start_frame=pos,
                )[0]
                for embeds, cache in zip(prompts, caches, strict=True)
            ]
            flow = flows[0] if len(flows) == 1 else flows[1] + self.guidance_scale * (flows[0] - flows[1])
            x = solver.step(flow, t, x)
        return x
