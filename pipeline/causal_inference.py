"""Few-step causal inference for a Self-Forcing generator (spec §8.2), whole-video or streamed.

It is the training rollout (`pipeline/common.py:few_step_blocks`) with every block running all K
denoising steps and no gradient: the same noise draws in the same order, so with the same
`torch.Generator` the training rollout with `last_step_only` produces the same latents.

Differences from upstream, on purpose:
* a trailing 0 in the step list is dropped (spec §9.21);
* the cache refresh uses the same rule as training: `add_noise(x0, eps, context_noise)` at timestep
  `context_noise` (x0 itself when it is 0). Upstream fed the clean x0 at inference but a noised one in
  training (spec §9.10); the model should see at test time the context it was trained with;
* the refresh after the last block is skipped (nothing reads it);
* videos longer than the KV cache need a rolling window (`local_attn_size`, `sink_size` on the
  model); without one, a video past `num_max_frames` is a clear error instead of an overflow.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .common import (
    BlockOutput,
    CachePool,
    InferenceOutput,
    cache_context,
    causal_dit,
    check_latents,
    few_step_blocks,
    kv_capacity,
    plan_blocks,
    prepare_step_list,
    prompt_embeds_of,
    timed_blocks,
)

logger = logging.getLogger(__name__)

__all__ = ["CausalInferencePipeline"]


class CausalInferencePipeline:
    """
    Args:
        generator: `WanDiffusionWrapper` around a `CausalWanModel` (its window sets the cache policy).
        scheduler: `FlowMatchScheduler` for re-noising between steps.
        denoising_step_list: warped few-step timesteps, high to low; a trailing 0 is dropped.
        num_frame_per_block: latent frames per block (N).
        independent_first_frame: layout `[1, N, N, ...]` when no initial latent is given.
        context_noise: timestep of the clean-context refresh.
        vae: optional `WanVAE`; then pixels are returned (`inference`) or streamed (`stream`).
        num_max_frames: KV cache capacity without a rolling window (None: sized to each video).
    """

    def __init__(
        self,
        generator: torch.nn.Module,
        scheduler,
        denoising_step_list: Tensor | Sequence[float],
        num_frame_per_block: int,
        independent_first_frame: bool = False,
        context_noise: float = 0.0,
        vae=None,
        num_max_frames: int | None = None,
    ) -> None:
        causal_dit(generator)
        if num_frame_per_block < 1:
            raise ValueError(f"num_frame_per_block must be >= 1, got {num_frame_per_block}")
        self.generator = generator
        self.scheduler = scheduler
        self.denoising_step_list = prepare_step_list(denoising_step_list, scheduler.num_train_timesteps)
        self.num_frame_per_block = num_frame_per_block
        self.independent_first_frame = independent_first_frame
        self.context_noise = float(context_noise)
        self.vae = vae
        self.num_max_frames = num_max_frames
        self._caches = CachePool()

    @torch.no_grad()
    def inference(
        self,
        noise: Tensor,
        conditional_dict: dict[str, Tensor],
        initial_latent: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> InferenceOutput:
        """Generate a whole video.

        Args:
            noise: `[B, F, C, H, W]` noise of the frames to generate.
            conditional_dict: `{"prompt_embeds": [B, L, text_dim]}`.
            initial_latent: `[B, F_in, C, H, W]` given first frames (image-to-video / continuation).
            generator: RNG of the fresh noise between denoising steps.
        Returns:
            `InferenceOutput(latents [B, F_in + F, C, H, W], videos [B, T, 3, H', W'] in [-1, 1] or None)`.
        """
        latents = torch.cat(
            [x for _, x in self._blocks(noise, conditional_dict, initial_latent, generator)], 1
        )
        videos = self.vae.decode(latents) if self.vae is not None else None
        return InferenceOutput(latents, videos)

    @torch.no_grad()
    def stream(
        self,
        noise: Tensor,
        conditional_dict: dict[str, Tensor],
        initial_latent: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[BlockOutput]:
        """Like `inference`, but yield each block (the initial latent first, if given) as soon as it
        exists, decoded with the VAE's streaming decoder when a VAE is set."""
        decoder = self.vae.stream_decoder() if self.vae is not None else None
        yield from timed_blocks(self._blocks(noise, conditional_dict, initial_latent, generator), decoder)

    def _blocks(
        self,
        noise: Tensor,
        conditional_dict: dict[str, Tensor],
        initial_latent: Tensor | None,
        rng: torch.Generator | None,
    ) -> Iterator[tuple[int, Tensor]]:
        model = causal_dit(self.generator)
        check_latents("noise", noise, model.config.in_dim)
        b, f, _, h, w = noise.shape
        embeds = prompt_embeds_of(conditional_dict, "conditional_dict", b)
        f_in = 0
        if initial_latent is not None:
            check_latents("initial_latent", initial_latent, model.config.in_dim)
            if initial_latent.shape[0] != b or initial_latent.shape[3:] != noise.shape[3:]:
                raise ValueError(
                    f"initial_latent {tuple(initial_latent.shape)} does not match noise {tuple(noise.shape)}"
                )
            f_in = initial_latent.shape[1]
        plan = plan_blocks(f_in, f, self.num_frame_per_block, self.independent_first_frame)
        capacity = kv_capacity(model, plan.total_frames, self.num_max_frames)
        caches = self._caches.get(model, b, (h, w), capacity, noise.dtype, noise.device)
        if initial_latent is not None:
            initial_latent = initial_latent.to(noise.dtype)
            cache_context(self.generator, initial_latent, embeds, caches, plan.context, 0, 0.0)
            yield 0, initial_latent
        last = len(self.denoising_step_list) - 1
        for start, x0, _ in few_step_blocks(
            self.generator,
            self.scheduler,
            self.denoising_step_list,
            noise,
            embeds,
            caches,
            plan.generated,
            f_in,
            [last] * len(plan.generated),
            self.context_noise,
            rng=rng,
        ):
            yield start, x0
