"""Sample videos during training: a few clips from the current (EMA when active) generator."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from pipeline.from_config import inference_pipeline
from utils.config import TrainConfig
from utils.ema import EMA


@torch.no_grad()
def sample_videos(
    cfg: TrainConfig,
    generator: nn.Module,
    text_encoder: nn.Module,
    vae,
    dataset: Dataset,
    ema: EMA | None,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> list[torch.Tensor] | None:
    """Videos of the first (up to) two data items' prompts, from noise seeded by `seed`, through the
    pipeline `inference.py` builds; `ema` (if any) is swapped in for the call. Every rank takes part."""
    pipe = inference_pipeline(cfg, generator, vae, num_max_frames=cfg.image_or_video_shape[1])
    items = [dataset[i] for i in range(min(2, len(dataset)))]
    prompts = [item["prompts"] for item in items]
    cond = {"prompt_embeds": text_encoder(prompts)["prompt_embeds"].to(device, dtype)}
    f, c, h, w = cfg.latent_shape
    image = None  # i2v: the samples continue the data's first frames (ODE data: the clean end's)
    if cfg.i2v:
        firsts = [
            item["image_latent"] if "image_latent" in item else item["ode_latent"][-1, :1] for item in items
        ]
        image = torch.stack(firsts).to(device, dtype)
        f -= 1
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), f, c, h, w, generator=g).to(device, dtype)
    generator.eval()
    try:
        with ema.swap_into(generator) if ema is not None else contextlib.nullcontext():
            out = pipe.inference(noise, cond, initial_latent=image, generator=g)
    finally:
        generator.train()
    return out.videos
