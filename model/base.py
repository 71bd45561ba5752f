"""The objective interface and the pieces every objective shares.

* `Objective`: the one interface the trainer drives (`sample_shared`, `generator_loss`, `critic_loss`,
  `trainable_modules`).
* `ScoreTimestepSampler`: the critic / distribution-matching timestep draw of spec §5.1.
* `SelfForcingGenerator`: upstream's `_run_generator` (spec §4, "wrapper around it"): the shared
  number of blocks and exit steps, the rollout, and the long-rollout rule (frames beyond the scored
  window are summarised by the VAE into one image latent).
* `chunk_index` / `sample_per_chunk`: one random choice per autoregressive chunk (ODE, diffusion,
  CausVid).
* `gradient_only_through`: a loss whose gradient reaches the generated latents but no parameter of
  the score networks it was computed with (SiD, GAN).

Layouts: latents `[B, F, C, H, W]`, timesteps `[B, F]` on the 0..T scale (docs/DESIGN.md).
Noise comes from the global torch RNG (the trainer seeds it per rank); random choices all ranks must
share come from `sample_shared` (drawn on rank 0 with an explicit `torch.Generator`, then broadcast).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_STEP_FRACTION",
    "MIN_STEP_FRACTION",
    "GeneratorOutput",
    "Objective",
    "ScoreTimestepSampler",
    "SelfForcingGenerator",
    "chunk_index",
    "gradient_only_through",
    "require",
    "sample_per_chunk",
    "timestep_bucket_metrics",
]

# Critic / DMD timesteps are clamped to [2 %, 98 %] of T (DMD2; upstream min_step / max_step).
MIN_STEP_FRACTION = 0.02
MAX_STEP_FRACTION = 0.98
# Loss metrics are reported per quarter of the timestep range (upstream buckets by t // 250).
NUM_TIMESTEP_BUCKETS = 4


class Objective(nn.Module):
    """A training objective: `(loss, metrics)` for the generator and, if `has_critic`, for the critic.

    `batch` keys (filled by the trainer): `prompt_embeds [B, L, D]`, `negative_prompt_embeds [B, L', D]`
    (CFG), optionally `clean_latent [B, F, C, H, W]`, `ode_latent [B, K+1, F, C, H, W]`,
    `image_latent [B, 1, C, H, W]`. `shared` is the dict returned by `sample_shared`, drawn once per
    loss evaluation on rank 0 and broadcast.
    """

    has_critic: bool = False

    @property
    def roles(self) -> tuple[str, ...]:
        return ("generator", "critic") if self.has_critic else ("generator",)

    def sample_shared(self, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        """Random choices every rank must agree on (plain Python values, so they broadcast as objects)."""
        return {}

    def generator_loss(
        self, batch: dict[str, Tensor], shared: dict[str, Any]
    ) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def critic_loss(
        self, batch: dict[str, Tensor], shared: dict[str, Any]
    ) -> tuple[Tensor, dict[str, float]]:
        raise RuntimeError(f"{type(self).__name__} has no critic (has_critic=False)")

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Role -> module the trainer optimises (`"generator"`, and `"critic"` if `has_critic`)."""
        raise NotImplementedError


def require(batch: dict[str, Tensor], key: str, owner: str, ndim: int | None = None) -> Tensor:
    """`batch[key]`, with an error naming the key (and the expected rank) when missing or misshaped."""
    if key not in batch or batch[key] is None:
        raise KeyError(f"{owner} needs batch[{key!r}]; the batch has keys {sorted(batch)}")
    value = batch[key]
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{owner}: batch[{key!r}] must have {ndim} dims, got shape {tuple(value.shape)}")
    return value


# ------------------------------------------------------------------------------------------------
# Timestep sampling (spec §5.1)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScoreTimestepSampler:
    """Timesteps at which the scores / critic look at generated (and real) videos, spec §5.1.

    `u ~ UniformInt[lo, hi)` per sample, `t = T * S(u / T)` with the SD3 shift
    `S(s) = shift * s / (1 + (shift - 1) * s)` when `timestep_shift > 1`, clamped to
    `[MIN_STEP_FRACTION * T, MAX_STEP_FRACTION * T]`. `lo` is the rollout's `denoised_timestep_to` when
    `ts_schedule` (else `min_score_timestep`), `hi` its `denoised_timestep_from` when `ts_schedule_max`
    (else T); both are in unshifted units, like `u`.
    """

    num_train_timestep: int = 1000
    timestep_shift: float = 1.0
    ts_schedule: bool = False
    ts_schedule_max: bool = False
    min_score_timestep: int = 0

    def bounds(self, denoised_from: float | None = None, denoised_to: float | None = None) -> tuple[int, int]:
        """`(lo, hi)` of the integer draw (unshifted units)."""
        lo = round(denoised_to) if self.ts_schedule and denoised_to is not None else self.min_score_timestep
        hi = (
            round(denoised_from)
            if self.ts_schedule_max and denoised_from is not None
            else self.num_train_timestep
        )
        if not 0 <= lo < hi <= self.num_train_timestep:
            raise ValueError(
                f"score timestep range [{lo}, {hi}) is empty or outside [0, {self.num_train_timestep}] "
                f"(min_score_timestep={self.min_score_timestep}, denoised_from={denoised_from}, "
                f"denoised_to={denoised_to}, ts_schedule={self.ts_schedule}, ts_schedule_max={self.ts_schedule_max})"
            )
        return lo, hi

    def shift(self, u: Tensor) -> Tensor:
        """`T * S(u / T)` in float64 (identity when `timestep_shift <= 1`, as upstream)."""
        u = u.to(torch.float64)
        if self.timestep_shift <= 1:
            return u
        s = u / self.num_train_timestep
        return self.num_train_timestep * self.timestep_shift * s / (1 + (self.timestep_shift - 1) * s)

    def sample(
        self,
        batch_size: int,
        num_frames: int,
        device: torch.device,
        denoised_from: float | None = None,
        denoised_to: float | None = None,
    ) -> Tensor:
        """One timestep per sample, repeated over frames: float32 `[B, F]` (global torch RNG)."""
        lo, hi = self.bounds(denoised_from, denoised_to)
        u = torch.randint(lo, hi, (batch_size, 1), device=device)
        t = self.shift(u).clamp(
            MIN_STEP_FRACTION * self.num_train_timestep, MAX_STEP_FRACTION * self.num_train_timestep
        )
        return t.to(torch.float32).expand(batch_size, num_frames).contiguous()


def timestep_bucket_metrics(
    per_item_loss: Tensor, t: Tensor, num_train_timestep: int, prefix: str = "loss_t_q"
) -> dict[str, float]:
    """Mean loss per quarter of [0, T]: `{prefix}{k}` for the buckets that occur (t // (T/4), capped at 3).

    `per_item_loss` and `t` have the same shape (per sample or per frame). Only buckets present in
    this batch are reported, so ranks may report different keys.
    """
    width = num_train_timestep / NUM_TIMESTEP_BUCKETS
    bucket = (t.detach().double() // width).clamp(max=NUM_TIMESTEP_BUCKETS - 1).long().flatten()
    loss = per_item_loss.detach().double().flatten()
    out = {}
    for k in range(NUM_TIMESTEP_BUCKETS):
        sel = bucket == k
        if sel.any():
            out[f"{prefix}{k}"] = loss[sel].mean().item()
    return out


# ------------------------------------------------------------------------------------------------
# Per-chunk random choices
# ------------------------------------------------------------------------------------------------
def chunk_index(num_frames: int, num_frame_per_block: int, independent_first_frame: bool = False) -> Tensor:
    """Chunk id of every latent frame, `[F]` long: chunks `[N, N, ...]` or `[1, N, N, ...]`."""
    rest = num_frames - (1 if independent_first_frame else 0)
    if rest < 0 or rest % num_frame_per_block:
        layout = "1 + k*N" if independent_first_frame else "k*N"
        raise ValueError(
            f"{num_frames} latent frames do not split into chunks of num_frame_per_block={num_frame_per_block} "
            f"(need {layout} frames, independent_first_frame={independent_first_frame})"
        )
    ids = torch.arange(rest) // num_frame_per_block
    if independent_first_frame:
        ids = torch.cat([torch.zeros(1, dtype=torch.long), ids + 1])
    return ids


def sample_per_chunk(
    low: int,
    high: int,
    batch_size: int,
    num_frames: int,
    num_frame_per_block: int,
    independent_first_frame: bool,
    device: torch.device,
) -> Tensor:
    """Integers `~ UniformInt[low, high)`, one per (sample, chunk), repeated over the chunk's frames: `[B, F]`."""
    ids = chunk_index(num_frames, num_frame_per_block, independent_first_frame).to(device)
    draws = torch.randint(low, high, (batch_size, int(ids[-1]) + 1), device=device)
    return draws[:, ids]


# ------------------------------------------------------------------------------------------------
# Gradient routing
# ------------------------------------------------------------------------------------------------
def zero_where_undefined(value: Tensor, *scores: Tensor) -> Tensor:
    """`value` (a score difference over the normaliser `mean|x - r|`) with the 0/0 of a zero normaliser
    set to 0, as upstream's `nan_to_num` does, but NaN everywhere when a score itself is not finite:
    a broken teacher or critic must make the step non-finite (skipped and counted), never a silent
    zero gradient."""
    finite = torch.stack([torch.isfinite(s).all() for s in scores]).all()
    return torch.where(finite, torch.nan_to_num(value), torch.full_like(value, float("nan")))


def gradient_only_through(loss: Tensor, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """A scalar equal to `loss` whose gradient w.r.t. `x` is `mask * d(loss)/dx` and zero elsewhere.

    Used when a generator loss is computed through score networks (SiD, GAN): the vector-Jacobian
    product through those networks is taken here with `torch.autograd.grad` w.r.t. `x` only, so their
    parameters never receive gradients from the generator step (upstream accumulates, then discards
    them), and their activations are freed before the generator's backward. The returned surrogate
    `sum(x * g) + const` carries the gradient on into the generator.

    Args:
        loss: scalar depending on `x` (and on score-network parameters).
        x: the generated latents `[B, F, C, H, W]` (part of the generator's graph).
        mask: optional boolean `[B, F, C, H, W]`; False entries get no gradient.
    """
    if not x.requires_grad:
        return loss.detach()
    (grad,) = torch.autograd.grad(loss, x)
    if mask is not None:
        grad = grad * mask
    surrogate = (x.double() * grad.double()).sum()
    return surrogate + (loss.detach().double() - surrogate.detach())


# ------------------------------------------------------------------------------------------------
# The Self-Forcing rollout as the objectives see it (spec §4, "wrapper around it")
# ------------------------------------------------------------------------------------------------
@dataclass
class GeneratorOutput:
    """What an objective scores.

    latents: `[B, F, C, H, W]`, F = the scored window; carries the generator's graph when run with grad.
    gradient_mask: boolean `[B, F, C, H, W]` (False = no generator gradient), or None for "all".
    denoised_timestep_from / _to: the exit step's interval in unshifted units (None if unknown).
    """

    latents: Tensor
    gradient_mask: Tensor | None = None
    denoised_timestep_from: float | None = None
    denoised_timestep_to: float | None = None


class SelfForcingGenerator:
    """Runs the Self-Forcing rollout for an objective (upstream `SelfForcingModel._run_generator`).

    Args:
        pipeline: a `SelfForcingTrainingPipeline` (holds the generator, scheduler and step list).
        image_or_video_shape: `[B, F, C, H, W]`; F is the window the scores see (upstream's 21), C, H, W
            the latent geometry; B is ignored (the batch size comes from the prompt embeddings).
        num_frame_per_block: N, latent frames per autoregressive chunk.
        num_training_frames: most latent frames rolled out (default F). Rollouts are drawn with a
            uniformly random number of chunks between F and this.
        independent_first_frame: chunks `[1, N, N, ...]`; required for image conditioning.
        vae: needed only when `num_training_frames > F` (see `run_generator`).
        latent_dtype: dtype of the rollout noise (and so of the pipeline's KV caches): bfloat16 under
            mixed precision, as upstream.
    """

    def __init__(
        self,
        pipeline,
        image_or_video_shape: Sequence[int],
        num_frame_per_block: int,
        num_training_frames: int | None = None,
        independent_first_frame: bool = False,
        vae: nn.Module | None = None,
        latent_dtype: torch.dtype = torch.float32,
    ) -> None:
        if len(image_or_video_shape) != 5:
            raise ValueError(
                f"image_or_video_shape must be [B, F, C, H, W], got {list(image_or_video_shape)}"
            )
        _, window, c, h, w = (int(v) for v in image_or_video_shape)
        self.pipeline = pipeline
        self.window = window
        self.latent_chw = (c, h, w)
        self.num_frame_per_block = num_frame_per_block
        self.independent_first_frame = independent_first_frame
        self.num_training_frames = window if num_training_frames is None else int(num_training_frames)
        self.vae = vae
        self.latent_dtype = latent_dtype
        if self.num_training_frames < window:
            raise ValueError(
                f"num_training_frames={self.num_training_frames} is smaller than the scored window "
                f"image_or_video_shape[1]={window}"
            )
        first = 1 if independent_first_frame else 0
        for name, frames in (
            ("image_or_video_shape[1]", window),
            ("num_training_frames", self.num_training_frames),
        ):
            if (frames - first) % num_frame_per_block:
                raise ValueError(
                    f"{name}={frames} is not {'1 + ' if first else ''}a multiple of num_frame_per_block="
                    f"{num_frame_per_block}"
                )
        if self.num_training_frames > window < 2:
            raise ValueError("rollouts longer than the window need a window of at least 2 frames")
        self.min_blocks = (window - first) // num_frame_per_block
        self.max_blocks = (self.num_training_frames - first) // num_frame_per_block

    @classmethod
    def build(
        cls,
        generator: nn.Module,
        scheduler,
        *,
        image_or_video_shape: Sequence[int],
        denoising_step_list: Sequence[float] = (1000, 750, 500, 250),
        num_frame_per_block: int = 3,
        num_training_frames: int | None = None,
        independent_first_frame: bool = False,
        same_step_across_blocks: bool = True,
        last_step_only: bool = False,
        context_noise: float = 0.0,
        vae: nn.Module | None = None,
        latent_dtype: torch.dtype = torch.float32,
        pipeline=None,
    ) -> SelfForcingGenerator:
        """Build the `SelfForcingTrainingPipeline` (unless `pipeline` is given) and wrap it.

        The one owner of the rollout settings: the rollout objectives (`DMD`, `SiD`, `GAN`) take the
        result as their `rollout` argument.

        Args:
            generator, scheduler: the causal student and the scheduler the pipeline re-noises with.
            image_or_video_shape: `[B, F, C, H, W]`: scored window F and latent geometry.
            denoising_step_list: few-step timesteps, already warped (the trainer applies
                `warp_denoising_step`), high to low.
            num_frame_per_block, independent_first_frame: the chunk layout `[N, N, ...]` / `[1, N, ...]`.
            same_step_across_blocks, last_step_only, context_noise: exit-step and context-refresh rules
                of the `SelfForcingTrainingPipeline`.
            num_training_frames: most frames rolled out (default F; the pipeline's KV cache holds this
                many); more than F needs `vae`.
            vae: `WanVAE` for the long-rollout rule.
            latent_dtype: dtype of the rollout noise and KV caches (bfloat16 under mixed precision).
            pipeline: a prebuilt rollout pipeline (then the pipeline settings above are not used).
        """
        if pipeline is None:
            from pipeline.self_forcing_training import SelfForcingTrainingPipeline

            pipeline = SelfForcingTrainingPipeline(
                generator,
                scheduler,
                list(denoising_step_list),
                num_frame_per_block,
                independent_first_frame=independent_first_frame,
                same_step_across_blocks=same_step_across_blocks,
                last_step_only=last_step_only,
                context_noise=context_noise,
                num_max_frames=num_training_frames or int(image_or_video_shape[1]),
            )
        return cls(
            pipeline,
            image_or_video_shape,
            num_frame_per_block,
            num_training_frames,
            independent_first_frame,
            vae,
            latent_dtype,
        )

    def sample_shared(self, batch_size: int, generator: torch.Generator) -> dict[str, Any]:
        """Number of N-frame blocks (uniform in [window, num_training_frames] frames) and exit steps."""
        num_blocks = int(torch.randint(self.min_blocks, self.max_blocks + 1, (1,), generator=generator))
        # One exit step per pipeline chunk; the extra single-frame chunk of independent_first_frame
        # is dropped at run time when an image latent takes its place.
        num_chunks = num_blocks + (1 if self.independent_first_frame else 0)
        exit_steps = [int(s) for s in self.pipeline.sample_exit_steps(num_chunks, generator=generator)]
        return {"num_blocks": num_blocks, "exit_steps": exit_steps}

    def run_generator(self, batch: dict[str, Tensor], shared: dict[str, Any]) -> GeneratorOutput:
        """Roll the generator out and return the window the scores see.

        Rolls out `num_blocks * N` (+1 first frame) latent frames from fresh noise, conditioned on
        `batch["prompt_embeds"]` (and on `batch["image_latent"]` `[B, 1, C, H, W]` if present). Only the
        last `window` frames may carry gradient. If more than `window` frames were made, the frames
        before the last `window - 1` are decoded by the VAE (no grad), the last decoded pixel frame is
        re-encoded as an image latent, and the window becomes `[image latent, last window - 1 frames]`;
        the gradient mask then excludes the first chunk of the window (spec §4).
        Gradients flow iff grad mode is enabled.
        """
        for key in ("num_blocks", "exit_steps"):
            if key not in shared:
                raise KeyError(f"shared[{key!r}] is missing; draw `shared` with sample_shared()")
        prompt = require(batch, "prompt_embeds", "SelfForcingGenerator", ndim=3)
        image = batch.get("image_latent")
        bsz, device = prompt.shape[0], prompt.device
        n = self.num_frame_per_block
        total = shared["num_blocks"] * n + (1 if self.independent_first_frame else 0)
        exit_steps = list(shared["exit_steps"])
        if total > self.window and self.vae is None:
            raise ValueError(
                f"the rollout has {total} latent frames, more than the scored window of {self.window}: a VAE is "
                "needed to re-encode the frames before the window (pass vae=...), or set "
                "num_training_frames equal to image_or_video_shape[1]"
            )
        if image is not None:
            if not self.independent_first_frame:
                raise ValueError(
                    "batch['image_latent'] (image-to-video) needs independent_first_frame=True so the image "
                    "is the first one-frame chunk"
                )
            c, h, w = self.latent_chw
            if tuple(image.shape) != (bsz, 1, c, h, w):
                raise ValueError(
                    f"batch['image_latent'] must be [{bsz}, 1, {c}, {h}, {w}], got {tuple(image.shape)}"
                )
            exit_steps = exit_steps[1:]
            image = image.to(self.latent_dtype)
        noise_frames = total - (1 if image is not None else 0)
        noise = torch.randn(bsz, noise_frames, *self.latent_chw, device=device, dtype=self.latent_dtype)
        out = self.pipeline.inference_with_trajectory(
            noise,
            {"prompt_embeds": prompt},
            exit_steps,
            initial_latent=image,
            gradient_from_frame=max(0, total - self.window),
        )
        latents = out.latents
        mask = None
        if latents.shape[1] > self.window:
            latents, mask = self._summarise_prefix(latents)
        return GeneratorOutput(latents, mask, out.denoised_timestep_from, out.denoised_timestep_to)

    def _summarise_prefix(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        keep = self.window - 1
        with torch.no_grad():
            pixels = self.vae.decode(latents[:, :-keep].detach())  # [B, T, 3, H, W]
            last = pixels[:, -1:].permute(0, 2, 1, 3, 4)  # [B, 3, 1, H, W]
            image_latent = self.vae.encode(last).to(latents.dtype)  # [B, 1, C, h, w]
        window = torch.cat([image_latent, latents[:, -keep:]], dim=1)
        mask = torch.ones_like(window, dtype=torch.bool)
        # The first chunk of the window is not a generated chunk of its own any more (it holds the
        # re-encoded image and the tail of a chunk that started before the window): no gradient there.
        mask[:, : 1 if self.independent_first_frame else self.num_frame_per_block] = False
        return window, mask
