"""Image-to-video training: with `i2v: true` every Self-Forcing rollout of DMD, SiD and GAN (generator and
critic steps) starts from the batch's image latent, wired from the config as train.py wires it.

References: the image the test put in the batch (the rollout's first frame must be it, bit for bit) and
the block layout written out here ([1, N, N]: the image, then 2 generated blocks of 3)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.build import build_objective_from_config, make_dit
from tests.wan_helpers import randomize_
from utils.config import load_config
from wan.gan_head import add_gan_head

ROOT = Path(__file__).resolve().parents[1]
B, F, C, H, W = 2, 7, 4, 8, 8  # configs/tiny_dmd_i2v.yaml: the image + 2 blocks of 3


def _objective(trainer: str):
    cfg = load_config(ROOT / "configs/tiny_dmd_i2v.yaml", [f"trainer={trainer}"])
    nets = {role: randomize_(make_dit(cfg, role), seed=i) for i, role in enumerate(("generator", "real_score", "fake_score"))}  # fmt: skip
    if trainer == "gan":
        add_gan_head(nets["fake_score"], num_class=1)
    objective = build_objective_from_config(
        cfg, nets["generator"], nets["real_score"], nets["fake_score"], None, torch.float32
    )
    return objective, nets["generator"]


@pytest.mark.parametrize("trainer", ["dmd", "sid", "gan"])
def test_every_rollout_starts_from_the_data_image(trainer, monkeypatch):
    objective, generator = _objective(trainer)
    pipeline = objective.rollout.pipeline
    calls = []
    rollout = pipeline.inference_with_trajectory

    def spy(noise, cond, exit_steps, initial_latent=None, gradient_from_frame=0, generator=None):
        out = rollout(noise, cond, exit_steps, initial_latent, gradient_from_frame, generator)
        calls.append((noise.shape, initial_latent, out.latents))
        return out

    monkeypatch.setattr(pipeline, "inference_with_trajectory", spy)
    g = torch.Generator().manual_seed(0)
    batch = {
        "prompt_embeds": torch.randn(B, 5, 32, generator=g),
        "negative_prompt_embeds": torch.randn(B, 5, 32, generator=g),
        "image_latent": torch.randn(B, 1, C, H, W, generator=g),
        "clean_latent": torch.randn(B, F, C, H, W, generator=g),  # the GAN's real clips
    }
    shared = objective.sample_shared(B, torch.Generator().manual_seed(1))
    loss, _ = objective.generator_loss(batch, shared)
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.parameters())
    objective.critic_loss(batch, objective.sample_shared(B, torch.Generator().manual_seed(2)))[0].backward()
    assert len(calls) == 2  # the generator step's rollout and the critic step's
    for noise_shape, initial, latents in calls:
        assert torch.equal(initial, batch["image_latent"])
        assert tuple(noise_shape) == (B, F - 1, C, H, W)  # 2 blocks of 3 after the image
        assert latents.shape == (B, F, C, H, W) and torch.equal(latents[:, :1], batch["image_latent"])
