"""The few-step inference pipeline a run's config describes: one construction for `inference.py`,
the trainer's sample videos and the shapes domain's evaluation, so none of them can drop a setting
(block layout, context noise, cache size) the others apply."""

from __future__ import annotations

import torch

from utils.config import TrainConfig
from utils.scheduler import FlowMatchScheduler

from .causal_inference import CausalInferencePipeline


def step_list(cfg: TrainConfig) -> list[float]:
    """`denoising_step_list`, warped through the generator's shifted grid if `warp_denoising_step`."""
    steps = [float(s) for s in cfg.denoising_step_list]
    if cfg.warp_denoising_step:
        sched = FlowMatchScheduler(
            shift=cfg.model_kwargs.timestep_shift, num_train_timesteps=cfg.num_train_timestep
        )
        steps = [float(s) for s in sched.warp(steps)]
    return steps


def inference_pipeline(
    cfg: TrainConfig, generator: torch.nn.Module, vae=None, num_max_frames: int | None = None
) -> CausalInferencePipeline:
    """`CausalInferencePipeline` over `generator` (a `WanDiffusionWrapper` around a `CausalWanModel`)
    with the config's step list (a final 0 dropped), block size, first-frame layout and context
    noise; `vae` decodes, `num_max_frames` sizes the KV cache (None: sized to each video)."""
    return CausalInferencePipeline(
        generator,
        generator.scheduler,
        [s for s in step_list(cfg) if s > 0],
        cfg.num_frame_per_block,
        independent_first_frame=cfg.independent_first_frame,
        context_noise=cfg.context_noise,
        vae=vae,
        num_max_frames=num_max_frames,
    )
