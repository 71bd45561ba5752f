"""Pieces shared by the Self-Forcing rollout and the causal samplers.

* step lists (`prepare_step_list`) and block layouts (`plan_blocks`);
* cache allocation sized from the model config (`allocate_caches`, `CachePool`);
* the few-step block loop (`few_step_blocks`), used unchanged by the training rollout and by
  `CausalInferencePipeline`, so that "inference" is literally the rollout with every block exiting
  at its last step and no gradient;
* streaming outputs (`BlockOutput`, `timed_blocks`).

Latents are `[B, F, C, H, W]` throughout; timesteps are on the 0..T scale (T = 1000).

Random numbers: every fresh Gaussian is drawn by `fresh_noise` from the caller's `torch.Generator`
(or the global RNG) in a fixed order: per block, one draw per re-noising between denoising steps,
then (only if `context_noise > 0`) one draw for the cache refresh. Two loops that make the same
choices therefore consume the same random numbers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from wan import CausalWanModel, CrossAttentionCache, KVCache
from wan.masks import chunk_sizes

__all__ = [
    "BlockOutput",
    "BlockPlan",
    "CachePool",
    "Caches",
    "InferenceOutput",
    "allocate_caches",
    "block_timesteps",
    "cache_context",
    "causal_dit",
    "check_latents",
    "few_step_blocks",
    "fresh_noise",
    "kv_capacity",
    "plan_blocks",
    "prepare_step_list",
    "prompt_embeds_of",
    "timed_blocks",
]


# ---------------------------------------------------------------------------------------------- inputs


def prepare_step_list(step_list: Sequence[float] | Tensor, num_train_timesteps: int) -> Tensor:
    """Validate a (warped) `denoising_step_list` and drop a trailing 0 (spec §3, §9.21).

    A trailing 0 would be a "denoising step" at a clean input; upstream's inference pipeline ran it
    (a wasted, off-distribution call), its training pipeline dropped it. We always drop it.
    Returns float32 `[K]`, strictly decreasing, every entry in `(0, T]`.
    """
    steps = torch.as_tensor(step_list, dtype=torch.float32).detach().cpu().flatten()
    if steps.numel() > 1 and steps[-1] == 0:
        steps = steps[:-1]
    if steps.numel() == 0:
        raise ValueError(f"denoising_step_list is empty (got {list(map(float, step_list))})")
    if (steps <= 0).any() or (steps > num_train_timesteps).any():
        raise ValueError(
            f"denoising_step_list entries must lie in (0, {num_train_timesteps}] (a single trailing 0 is "
            f"allowed and dropped); got {steps.tolist()}"
        )
    if (steps[1:] >= steps[:-1]).any():
        raise ValueError(f"denoising_step_list must be strictly decreasing; got {steps.tolist()}")
    return steps


def causal_dit(generator: torch.nn.Module) -> CausalWanModel:
    """The `CausalWanModel` inside a `WanDiffusionWrapper`; a clear error for anything else."""
    model = getattr(generator, "model", None)
    if not isinstance(model, CausalWanModel):
        raise TypeError(
            f"the generator must be a WanDiffusionWrapper around a CausalWanModel; got "
            f"{type(generator).__name__} holding {type(model).__name__}"
        )
    return model


@dataclass(frozen=True)
class BlockPlan:
    """Block layout of one video: `context` covers the initial latent frames (cached, not denoised),
    `generated` the frames made from noise. Sizes in latent frames, in order."""

    context: list[int]
    generated: list[int]

    @property
    def num_context_frames(self) -> int:
        return sum(self.context)

    @property
    def total_frames(self) -> int:
        return sum(self.context) + sum(self.generated)


def plan_blocks(
    num_initial_frames: int, num_noise_frames: int, num_frame_per_block: int, independent_first_frame: bool
) -> BlockPlan:
    """Layout of a video made of `num_initial_frames` given frames followed by `num_noise_frames` new ones.

    Without initial frames the generated layout is `[N, N, ...]`, or `[1, N, N, ...]` with
    `independent_first_frame` (spec §2.5). Given frames are cached as the model's layout when they fit
    it (`[N, ...]`, e.g. a continued video), else with the first frame alone (`[1, N, ...]`, e.g. one
    image latent, which is how upstream caches an image). After given frames, new frames always come in
    blocks of N (the independent first frame, if any, is the image).
    """
    n = num_frame_per_block
    if num_noise_frames <= 0:
        raise ValueError(f"noise must have at least one latent frame, got {num_noise_frames}")
    if num_initial_frames == 0:
        return BlockPlan([], chunk_sizes(num_noise_frames, n, independent_first_frame))
    if not independent_first_frame and num_initial_frames % n == 0:
        context = chunk_sizes(num_initial_frames, n, False)
    else:
        try:
            context = chunk_sizes(num_initial_frames, n, True)
        except ValueError:
            raise ValueError(
                f"initial_latent has {num_initial_frames} frames; with num_frame_per_block={n} it must have "
                f"1 + k*{n}" + ("" if independent_first_frame else f" or k*{n}") + " frames"
            ) from None
    if num_noise_frames % n:
        raise ValueError(
            f"noise has {num_noise_frames} latent frames after an initial latent; it must be a multiple of "
            f"num_frame_per_block={n}"
        )
    return BlockPlan(context, [n] * (num_noise_frames // n))


def check_latents(name: str, x: Tensor, in_dim: int) -> None:
    """Raise a clear error unless `x` is `[B, F, in_dim, H, W]`."""
    if x.ndim != 5 or x.shape[2] != in_dim:
        raise ValueError(f"{name} must be [B, F, {in_dim}, H, W] latents; got shape {tuple(x.shape)}")


def prompt_embeds_of(conditional_dict: dict, name: str, batch_size: int) -> Tensor:
    """`conditional_dict["prompt_embeds"]`, checked to be `[batch_size, L, text_dim]`."""
    embeds = conditional_dict.get("prompt_embeds") if isinstance(conditional_dict, dict) else None
    if embeds is None:
        raise KeyError(f"{name} needs a 'prompt_embeds' entry ([B, L, text_dim])")
    if embeds.ndim != 3 or embeds.shape[0] != batch_size:
        raise ValueError(
            f"{name}['prompt_embeds'] must be [B={batch_size}, L, text_dim]; got {tuple(embeds.shape)}"
        )
    return embeds


# ---------------------------------------------------------------------------------------------- caches


@dataclass
class Caches:
    """Self-attention KV cache and text cross-attention cache of one video batch."""

    kv: KVCache
    xattn: CrossAttentionCache

    def reset(self) -> None:
        self.kv.reset()
        self.xattn.reset()


def kv_capacity(model: CausalWanModel, total_frames: int, num_max_frames: int | None) -> int:
    """KV cache capacity in frames for a video of `total_frames`.

    With a rolling window the capacity is the window (the cache class sizes it); without one the
    cache must hold the whole video: `num_max_frames` if given (a clear error past it), else the video.
    """
    if model.local_attn_size != -1:
        return num_max_frames or total_frames
    if num_max_frames is None:
        return total_frames
    if total_frames > num_max_frames:
        raise ValueError(
            f"the video has {total_frames} latent frames but the KV cache holds num_max_frames="
            f"{num_max_frames} without a rolling window; build the CausalWanModel with local_attn_size "
            f"(and sink_size) to generate longer videos"
        )
    return num_max_frames


def allocate_caches(
    model: CausalWanModel,
    batch_size: int,
    latent_hw: tuple[int, int],
    max_frames: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Caches:
    """Fresh caches sized from the model config, its attention window and the latent size.

    `dtype` must be the generator's compute dtype (the pipelines pass the noise's dtype, as upstream:
    run bf16 models, or FSDP with bf16 compute, on bf16 noise).
    """
    kv = KVCache.for_model(model, batch_size, latent_hw, max_frames, dtype=dtype, device=device)
    return Caches(kv, CrossAttentionCache.for_model(model))


class CachePool:
    """Keeps one `Caches` between calls: reset (not reallocated) when the next call has the same
    geometry, reallocated otherwise."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._caches: Caches | None = None

    def get(
        self,
        model: CausalWanModel,
        batch_size: int,
        latent_hw: tuple[int, int],
        max_frames: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> Caches:
        key = (
            batch_size,
            tuple(latent_hw),
            max_frames,
            model.local_attn_size,
            model.sink_size,
            dtype,
            device,
        )
        if self._caches is None or key != self._key:
            self._caches = allocate_caches(model, batch_size, latent_hw, max_frames, dtype, device)
            self._key = key
        else:
            self._caches.reset()
        return self._caches


# ---------------------------------------------------------------------------------------------- the loop


def fresh_noise(like: Tensor, rng: torch.Generator | None) -> Tensor:
    """Standard Gaussian shaped like `like`, from `rng` (drawn on the generator's device) or the global RNG."""
    if rng is None:
        return torch.randn(like.shape, dtype=like.dtype, device=like.device)
    return torch.randn(like.shape, generator=rng, dtype=like.dtype, device=rng.device).to(like.device)


def block_timesteps(x: Tensor, t: float | Tensor) -> Tensor:
    """Per-frame timesteps `[B, f]` (float32) for a block `x: [B, f, C, H, W]`."""
    return torch.full(x.shape[:2], float(t), dtype=torch.float32, device=x.device)


def cache_context(
    generator: torch.nn.Module,
    latents: Tensor,
    prompt_embeds: Tensor,
    caches: Caches,
    blocks: Sequence[int],
    start_frame: int,
    timestep: float,
) -> None:
    """Write `latents: [B, sum(blocks), C, H, W]` into the caches block by block at `timestep`, no grad."""
    offset = 0
    with torch.no_grad():
        for f in blocks:
            x = latents[:, offset : offset + f]
            generator(
                x,
                block_timesteps(x, timestep),
                prompt_embeds,
                kv_cache=caches.kv,
                crossattn_cache=caches.xattn,
                current_start_frame=start_frame + offset,
            )
            offset += f


def few_step_blocks(
    generator: torch.nn.Module,
    scheduler,
    steps: Tensor,
    noise: Tensor,
    prompt_embeds: Tensor,
    caches: Caches,
    blocks: Sequence[int],
    start_frame: int,
    exit_steps: Sequence[int],
    context_noise: float,
    grad_from_frame: float = float("inf"),
    rng: torch.Generator | None = None,
) -> Iterator[tuple[int, Tensor, bool]]:
    """The few-step causal loop over the generated blocks (spec §4, §8.2); yields one block at a time.

    For block `b` of `f` frames starting at absolute frame `p` (noise `[B, f, C, H, W]`):
      1. steps `k < exit_steps[b]`: no grad, `x0 = G(x, t_k)`, then `x = add_noise(x0, fresh eps, t_{k+1})`;
      2. step `exit_steps[b]`: `x0 = G(x, t_exit)`, with grad iff grad is enabled and `p >= grad_from_frame`;
      3. yield `(p, x0, with_grad)`;
      4. unless it is the last block: refresh the cache, no grad, with `G(c, context_noise)` where
         `c = add_noise(x0.detach(), fresh eps, context_noise)` if `context_noise > 0` else `x0` itself.
         Because sigma is continuous here, `context_noise = 0` feeds the clean `x0` exactly; upstream
         quantised t=0 to sigma≈0.005 in training (spec §9.10). The refresh after the last block is
         skipped: nothing reads it.

    Each call of the same block rewrites that block's cache slots, so after step 4 the cache holds the
    clean context only. Grad-enabled calls never write the cache (`wan/cache.py`).
    """
    if len(exit_steps) != len(blocks):
        raise ValueError(f"exit_steps has {len(exit_steps)} entries for {len(blocks)} generated blocks")
    grad_mode = torch.is_grad_enabled()
    offset = 0
    for b, (f, exit_k) in enumerate(zip(blocks, exit_steps, strict=True)):
        pos = start_frame + offset
        kwargs = {"kv_cache": caches.kv, "crossattn_cache": caches.xattn, "current_start_frame": pos}
        x = noise[:, offset : offset + f]
        # 1. denoising steps before the exit, no grad
        with torch.no_grad():
            for k in range(exit_k):
                _, x0 = generator(x, block_timesteps(x, steps[k]), prompt_embeds, **kwargs)
                x = scheduler.add_noise(x0, fresh_noise(x0, rng), steps[k + 1]).to(noise.dtype)
        # 2. the exit step: the block's only differentiable evaluation
        with_grad = grad_mode and pos >= grad_from_frame
        with torch.set_grad_enabled(with_grad):
            _, x0 = generator(x, block_timesteps(x, steps[exit_k]), prompt_embeds, **kwargs)
        yield pos, x0, with_grad
        # 4. clean-context refresh (the consumer's code between yields runs first)
        if b + 1 < len(blocks):
            with torch.no_grad():
                ctx = x0.detach()
                if context_noise > 0:
                    ctx = scheduler.add_noise(ctx, fresh_noise(ctx, rng), context_noise)
                generator(ctx, block_timesteps(ctx, context_noise), prompt_embeds, **kwargs)
        offset += f


# ---------------------------------------------------------------------------------------------- outputs


@dataclass
class InferenceOutput:
    """`latents: [B, F, C, H, W]`; `videos: [B, T, 3, H*s, W*s]` in [-1, 1] when a VAE was given."""

    latents: Tensor
    videos: Tensor | None = None


@dataclass
class BlockOutput:
    """One streamed block: `latents: [B, f, C, H, W]`, its decoded `frames: [B, T_f, 3, H', W']` in
    [-1, 1] (None without a VAE), its first absolute latent frame, and the seconds it took to produce
    (from the consumer's request to the block being ready, decode included): `latency_s` =
    `dit_s` (denoising and cache refresh) + `decode_s` (VAE)."""

    latents: Tensor
    frames: Tensor | None
    start_frame: int
    latency_s: float
    dit_s: float = 0.0
    decode_s: float = 0.0


def _synchronize(device: torch.device) -> None:
    # Accelerators run asynchronously; wait so the latency covers the work, not just its launch.
    if device.type != "cpu":
        torch.get_device_module(device).synchronize(device)


def timed_blocks(blocks: Iterator[tuple[int, Tensor]], decoder=None) -> Iterator[BlockOutput]:
    """Wrap `(start_frame, latents)` blocks into `BlockOutput`s, decoding each with a streaming decoder."""
    start = time.perf_counter()
    for first_frame, latents in blocks:
        _synchronize(latents.device)
        denoised = time.perf_counter()
        frames = decoder.decode(latents) if decoder is not None else None
        _synchronize(latents.device)
        done = time.perf_counter()
        yield BlockOutput(latents, frames, first_frame, done - start, denoised - start, done - denoised)
        start = time.perf_counter()
