"""Samples of the chain's trained networks, the same way for every method: the students' few-step
autoregressive pipeline, the base model's own samplers, and the base's denoising error.

Sample i of a call always starts from the noise seeded by (seed, i), so every method (and the base)
is judged on the same noise for the same prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .codec import WorldCodec
from .render import Prompt, render_prompt
from .teacher import ExactTeacher
from .text import WorldTextEncoder

__all__ = [
    "base_ode_samples", "base_x0_rmse", "bidirectional_copy", "few_step_samples", "generate", "load_network",
    "load_run_config",
    "ode_samples", "seeded_noise", "x0_rmse",
]  # fmt: skip

BATCH = 64  # videos per pipeline call (memory is small; this only bounds peak RSS)


def seeded_noise(count: int, frames: int, shape: Sequence[int], seed: int) -> Tensor:
    """`[count, frames, C, h, w]`: sample i's noise is seeded by (seed, i), whatever `count` is."""
    return torch.stack(
        [
            torch.randn(frames, *shape, generator=torch.Generator().manual_seed(seed * 100003 + i))
            for i in range(count)
        ]
    )


# Run directories written before the world's pieces became components (utils/components.py) name
# them by the presets the core used to know; their config.yaml still loads, as these components.
LEGACY_PRESETS = {
    ("generator_model", "world"): "world.network.wan_config",
    ("fake_score_model", "world"): "world.network.wan_config",
    ("real_score_model", "world"): "world.network.wan_config",
    ("real_score_model", "world-exact"): "world.teacher.ExactTeacher",
}


def load_run_config(config: Path, overrides: Sequence[str] = ()):
    """`load_config` of a world run's config.yaml, a pre-component one included (`LEGACY_PRESETS`)."""
    import yaml

    from utils.config import load_config

    saved = yaml.safe_load(Path(config).read_text(encoding="utf-8")) or {}
    legacy = [
        f"{key}={{_component_: {path}}}"
        for (key, name), path in LEGACY_PRESETS.items()
        if saved.get(key) == name
    ]
    if legacy and saved.get("text_encoder") is None:
        legacy += [
            "text_encoder={_component_: world.text.WorldTextEncoder}",
            "vae={_component_: world.codec.WorldCodec}",
        ]
    return load_config(str(config), [*legacy, *overrides])


def load_network(run_dir: Path, config: Path, overrides: Sequence[str] = (), entry: str = "generator"):
    """(config, generator wrapper in eval mode with the run's trained weights: `entry` "generator", or
    "ema" / "ema_<rate>" for its EMA)."""
    from model.build import make_dit
    from utils.checkpoint import read_run_model

    cfg = load_run_config(config, overrides)
    wrapper = make_dit(cfg, "generator")
    wrapper.load_state_dict(read_run_model(run_dir, entry))
    return cfg, wrapper.eval()


def _prompt_embeds(wrapper, prompts: Sequence[Prompt]) -> Tensor:
    text = WorldTextEncoder(wrapper.config.text_dim, wrapper.config.text_len)
    return text([q.text for q in prompts])["prompt_embeds"]


@torch.no_grad()
def few_step_samples(
    pipe, prompts: Sequence[Prompt], num_frames: int, seed: int = 0, context: Tensor | None = None
) -> Tensor:
    """Pixels `[N, F, 3, 16, 16]` from a few-step autoregressive pipeline whose vae is the world's
    codec (a causal model whose one block spans the clip samples it bidirectionally).

    `context`: given first frames `[N, K, 3, 16, 16]` in [-1, 1] (image-to-video, continuation),
    encoded with the world codec and cached as clean context (t = 0) as `inference.py --image/--video`
    does; the videos start with them and `num_frames` counts them (F - K frames are generated, from
    the same seeded noise rule as without context)."""
    wrapper = pipe.generator
    c, h, w = wrapper.config.in_dim, *_latent_grid()
    given = 0
    if context is not None:
        if context.ndim != 5 or context.shape[0] != len(prompts) or not 0 < context.shape[1] < num_frames:
            raise ValueError(
                f"few_step_samples: context must be [N={len(prompts)}, K, 3, H, W] with 0 < K < "
                f"num_frames={num_frames}, got {tuple(context.shape)}"
            )
        given = context.shape[1]
        latents = pipe.vae.encode(context.transpose(1, 2).float())  # [N, K, C, h, w]
    noise = seeded_noise(len(prompts), num_frames - given, (c, h, w), seed)
    embeds = _prompt_embeds(wrapper, prompts)
    out = []
    for start in range(0, len(prompts), BATCH):
        part = slice(start, start + BATCH)
        g = torch.Generator().manual_seed(seed + start)
        initial = None if context is None else latents[part]
        cond = {"prompt_embeds": embeds[part]}
        out.append(pipe.inference(noise[part], cond, initial_latent=initial, generator=g).videos)
    return torch.cat(out)


@torch.no_grad()
def ode_samples(
    wrapper, shift: float, prompts: Sequence[Prompt], num_frames: int, num_steps: int, seed: int = 0
) -> Tensor:
    """Pixels `[N, F, 3, 16, 16]`: a bidirectional network's probability-flow ODE, `num_steps` Euler
    steps on its shifted grid, conditional score only (the world's prompts need no guidance)."""
    from pipeline import BidirectionalSampler

    sampler = BidirectionalSampler(wrapper, shift=shift, num_steps=num_steps, guidance_scale=1.0)
    noise = seeded_noise(len(prompts), num_frames, (wrapper.config.in_dim, *_latent_grid()), seed)
    embeds = _prompt_embeds(wrapper, prompts)
    latents = torch.cat(
        [
            sampler.sample(noise[s : s + BATCH], embeds[s : s + BATCH]).latents
            for s in range(0, len(prompts), BATCH)
        ]
    )
    return WorldCodec().decode(latents)


@torch.no_grad()
def x0_rmse(
    wrapper,
    prompts: Sequence[Prompt],
    num_frames: int,
    timesteps: Sequence[float],
    draws: int = 4,
    seed: int = 0,
    random_start: bool = False,
) -> dict[str, float]:
    """Root mean squared difference between a network's x0 prediction and the exact teacher's (the
    posterior mean), over every clip of `prompts` noised to each timestep (`draws` noise draws each):
    `{str(t): rmse}` in pixel units ([-1, 1]). `random_start`: that world's clips and teacher."""
    text = WorldTextEncoder(wrapper.config.text_dim, wrapper.config.text_len)
    teacher = ExactTeacher(text, random_start=random_start)
    clips = torch.cat([render_prompt(q, num_frames, random_start) for q in prompts])  # [P*K, F, 3, H, W]
    clean = WorldCodec().encode(clips.transpose(1, 2))
    per_prompt = clips.shape[0] // len(prompts)
    embeds = text([q.text for q in prompts])["prompt_embeds"].repeat_interleave(per_prompt, 0)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t_value in timesteps:
        t = torch.full(clean.shape[:2], float(t_value))
        squared = []
        for _ in range(draws):
            noisy = wrapper.scheduler.add_noise(clean, torch.randn(clean.shape, generator=g), t)
            _, x0_teacher = teacher(noisy, t, embeds)
            _, x0_net = wrapper(noisy, t, embeds)
            squared.append(((x0_net.float() - x0_teacher.float()) ** 2).mean())
        out[f"{float(t_value):g}"] = float(torch.stack(squared).mean().sqrt())
    return out


def bidirectional_copy(wrapper):
    """The weights of a causal wrapper whose one block spans the clip, in a bidirectional `WanModel`
    wrapper (the same function: full attention over the clip)."""
    from wan import WanDiffusionWrapper, WanModel

    copy = WanDiffusionWrapper(WanModel(wrapper.config), wrapper.scheduler)
    copy.load_state_dict(wrapper.state_dict())
    return copy.eval()


# -- the same, for a trained run directory ----------------------------------------------------------


def generate(
    run_dir: Path, config: Path, prompts: Sequence[Prompt], num_frames: int, overrides: Sequence[str] = (),
    seed: int = 0, context: Tensor | None = None, entry: str = "generator",
) -> Tensor:  # fmt: skip
    """`few_step_samples` of a run's generator (or its EMA: `entry`, as `load_network`) through the
    pipeline `inference.py` builds from the run's config (block size, step list, first-frame layout,
    window; `overrides` change them); `context`: given first frames, as there."""
    from pipeline.from_config import inference_pipeline

    cfg, wrapper = load_network(run_dir, config, overrides, entry)
    pipe = inference_pipeline(cfg, wrapper, WorldCodec(), num_max_frames=num_frames)
    return few_step_samples(pipe, prompts, num_frames, seed, context)


def base_ode_samples(
    run_dir: Path, config: Path, prompts: Sequence[Prompt], num_frames: int, num_steps: int, seed: int = 0
) -> Tensor:
    cfg, wrapper = load_network(run_dir, config)
    return ode_samples(
        bidirectional_copy(wrapper), cfg.model_kwargs.timestep_shift, prompts, num_frames, num_steps, seed
    )


def base_x0_rmse(
    run_dir: Path, config: Path, prompts: Sequence[Prompt], num_frames: int, timesteps: Sequence[float],
    random_start: bool = False,
) -> dict[str, float]:  # fmt: skip
    _, wrapper = load_network(run_dir, config)
    return x0_rmse(bidirectional_copy(wrapper), prompts, num_frames, timesteps, random_start=random_start)


def _latent_grid() -> tuple[int, int]:
    from .codec import FACTOR
    from .render import SIZE

    return SIZE // FACTOR, SIZE // FACTOR
