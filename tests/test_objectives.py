"""Shared objective machinery: timestep sampling (spec §5.1) against the formula, per-chunk draws,
the rollout wrapper (spec §4) including the long-rollout VAE rule, and the factory."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan

from model import DMD, OBJECTIVES, build_objective
from model.base import (
    ScoreTimestepSampler,
    SelfForcingGenerator,
    chunk_index,
    gradient_only_through,
    sample_per_chunk,
)
from pipeline.self_forcing_training import SelfForcingTrainingPipeline
from tests.wan_helpers import randomize_
from utils.scheduler import FlowMatchScheduler
from wan import CausalWanModel, WanConfig, WanDiffusionWrapper, WanModel
from wan.vae import WanVAE

TINY = WanConfig.preset("tiny")
C, H, W = TINY.in_dim, 4, 4
N = 3
T = 1000


def _shifted(u: torch.Tensor, s: float) -> torch.Tensor:
    # spec §5.1: t = 1000 * s*(u/1000) / (1 + (s-1)*u/1000), then clamp to [20, 980]
    sig = u.double() / T
    return (T * s * sig / (1 + (s - 1) * sig)).clamp(20, 980)


# ----------------------------------------------------------------------------------------------
# timestep sampling
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 5.0])
def test_sampler_values_are_the_clamped_shift_of_integers(shift):
    sampler = ScoreTimestepSampler(num_train_timestep=T, timestep_shift=shift)
    t = sampler.sample(20000, 6, torch.device("cpu"))
    assert t.shape == (20000, 6) and t.dtype == torch.float32
    assert torch.equal(t, t[:, :1].expand_as(t)), "one timestep per sample, repeated over frames"
    allowed = _shifted(torch.arange(T), shift).float()
    # every draw is one of the 1000 allowed values
    assert torch.isin(t[:, 0], allowed).all()
    assert t.min() >= 20 and t.max() <= 980
    # clamp frequencies: u >= ceil(u*) clamps at 980, u <= floor(u_) at 20 (u uniform over 0..999)
    p_hi = (allowed == 980).double().mean().item()
    p_lo = (allowed == 20).double().mean().item()
    assert abs((t[:, 0] == 980).double().mean().item() - p_hi) < 0.01
    assert abs((t[:, 0] == 20).double().mean().item() - p_lo) < 0.005
    if shift == 5.0:
        assert 0.08 < p_hi < 0.10  # "about 9 % of draws clamp at 980" (spec §5.1)


def test_sampler_ts_schedule_bounds():
    both = ScoreTimestepSampler(T, timestep_shift=5.0, ts_schedule=True, ts_schedule_max=True)
    assert both.bounds(750, 500) == (500, 750)
    t = both.sample(5000, 1, torch.device("cpu"), denoised_from=750, denoised_to=500)
    allowed = _shifted(torch.arange(500, 750), 5.0).float()
    assert torch.isin(t[:, 0], allowed).all()
    assert len(torch.unique(t)) > 100  # the whole interval is used, not one point
    # only the lower bound
    lower = ScoreTimestepSampler(T, timestep_shift=1.0, ts_schedule=True)
    assert lower.bounds(750, 500) == (500, T)
    assert lower.bounds(None, None) == (0, T)
    # only the upper bound, with min_score_timestep as the lower one
    upper = ScoreTimestepSampler(T, timestep_shift=1.0, ts_schedule_max=True, min_score_timestep=100)
    assert upper.bounds(250, 0) == (100, 250)
    t = upper.sample(3000, 2, torch.device("cpu"), denoised_from=250, denoised_to=0)
    assert t.min() >= 100 and t.max() <= 249
    # off: rollout interval ignored
    off = ScoreTimestepSampler(T, min_score_timestep=7)
    assert off.bounds(750, 500) == (7, T)


def test_sampler_empty_range_is_an_error():
    s = ScoreTimestepSampler(T, ts_schedule_max=True, min_score_timestep=300)
    with pytest.raises(ValueError, match="empty"):
        s.bounds(250, 0)


# ----------------------------------------------------------------------------------------------
# per-chunk draws
# ----------------------------------------------------------------------------------------------
def test_chunk_index_layouts():
    assert chunk_index(6, 3).tolist() == [0, 0, 0, 1, 1, 1]
    assert chunk_index(7, 3, independent_first_frame=True).tolist() == [0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="num_frame_per_block=3"):
        chunk_index(7, 3)


def test_sample_per_chunk_is_constant_within_chunks_and_independent_across():
    draws = sample_per_chunk(0, 1000, 64, 7, 3, True, torch.device("cpu"))
    assert draws.shape == (64, 7)
    assert (draws[:, 1:4] == draws[:, 1:2]).all() and (draws[:, 4:] == draws[:, 4:5]).all()
    assert (draws[:, 0] != draws[:, 1]).any() and (draws[:, 1] != draws[:, 4]).any()
    assert draws.min() >= 0 and draws.max() < 1000


# ----------------------------------------------------------------------------------------------
# gradient routing helper
# ----------------------------------------------------------------------------------------------
def test_gradient_only_through_reaches_x_but_not_the_scoring_parameters():
    weight = torch.nn.Parameter(torch.randn(4, 4))
    leaf = torch.randn(2, 4, requires_grad=True)
    x = 3.0 * leaf  # x is an intermediate of the "generator" graph
    mask = torch.tensor([[True, False, True, True], [False, True, True, False]])
    loss = torch.tanh(x @ weight).pow(2).sum()
    (grad_x,) = torch.autograd.grad(loss, x, retain_graph=True)
    surrogate = gradient_only_through(loss, x, mask)
    assert surrogate.item() == pytest.approx(loss.item(), rel=1e-12)
    surrogate.backward()
    assert weight.grad is None
    torch.testing.assert_close(leaf.grad, 3.0 * grad_x * mask)


# ----------------------------------------------------------------------------------------------
# the rollout wrapper
# ----------------------------------------------------------------------------------------------
def _generator(seed: int = 0) -> WanDiffusionWrapper:
    sched = FlowMatchScheduler(shift=5.0)
    return WanDiffusionWrapper(randomize_(CausalWanModel(TINY, num_frame_per_block=N), seed=seed), sched)


class SpyPipeline:
    """The real pipeline, recording what the wrapper asks of it and what it returns."""

    def __init__(self, pipeline: SelfForcingTrainingPipeline) -> None:
        self.inner = pipeline
        self.calls: list[dict] = []

    def sample_exit_steps(self, num_blocks, generator=None):
        return self.inner.sample_exit_steps(num_blocks, generator=generator)

    def inference_with_trajectory(self, noise, cond, exit_steps, initial_latent=None, gradient_from_frame=0):
        out = self.inner.inference_with_trajectory(
            noise, cond, exit_steps, initial_latent=initial_latent, gradient_from_frame=gradient_from_frame
        )
        self.calls.append(
            {
                "noise": noise,
                "exit_steps": list(exit_steps),
                "initial_latent": initial_latent,
                "gradient_from_frame": gradient_from_frame,
                "out": out,
            }
        )
        return out


def _rollout(window: int, max_frames: int, iff: bool = False, vae=None, seed: int = 0):
    gen = _generator(seed)
    steps = gen.scheduler.warp([1000, 750, 500, 250])
    pipe = SpyPipeline(
        SelfForcingTrainingPipeline(
            gen, gen.scheduler, steps, N, independent_first_frame=iff, num_max_frames=max_frames
        )
    )
    runner = SelfForcingGenerator(pipe, [1, window, C, H, W], N, max_frames, iff, vae)
    return gen, pipe, runner


def _prompt(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 5, TINY.text_dim)


def test_shared_draw_covers_the_frame_range():
    _, _, runner = _rollout(window=6, max_frames=12)
    g = torch.Generator().manual_seed(0)
    draws = [runner.sample_shared(2, g) for _ in range(60)]
    assert {d["num_blocks"] for d in draws} == {2, 3, 4}
    assert all(len(d["exit_steps"]) == d["num_blocks"] for d in draws)
    assert all(0 <= s < 4 for d in draws for s in d["exit_steps"])
    # the same generator seed gives the same choices (rank 0 draws, others receive)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert runner.sample_shared(2, g1) == runner.sample_shared(2, g2)


def test_window_sized_rollout_has_no_mask_and_full_gradient():
    gen, pipe, runner = _rollout(window=6, max_frames=6)
    out = runner.run_generator({"prompt_embeds": _prompt()}, {"num_blocks": 2, "exit_steps": [1, 1]})
    assert out.latents.shape == (2, 6, C, H, W)
    assert out.gradient_mask is None
    assert (out.denoised_timestep_from, out.denoised_timestep_to) == (750, 500)
    assert pipe.calls[0]["gradient_from_frame"] == 0
    assert pipe.calls[0]["noise"].shape == (2, 6, C, H, W)
    assert pipe.calls[0]["out"].grad_evaluations == 2


def _tiny_vae() -> WanVAE:
    torch.manual_seed(0)
    return WanVAE(
        AutoencoderKLWan(
            base_dim=8,
            z_dim=C,
            dim_mult=[1, 2, 4, 4],
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False, True, True],
            latents_mean=[0.0] * C,
            latents_std=[1.0] * C,
        )
    )


def test_long_rollout_rule_with_vae():
    vae = _tiny_vae()
    window, total = 6, 9
    gen, pipe, runner = _rollout(window=window, max_frames=total, vae=vae)
    out = runner.run_generator({"prompt_embeds": _prompt()}, {"num_blocks": 3, "exit_steps": [2, 2, 2]})
    raw = pipe.calls[0]["out"].latents  # [B, 9, C, H, W]
    # only blocks inside the last `window` frames carry gradient: the one starting at frame 0 does not
    assert pipe.calls[0]["gradient_from_frame"] == total - window
    assert pipe.calls[0]["out"].grad_evaluations == 2
    assert out.latents.shape == (2, window, C, H, W)
    # frames 1.. are the last window-1 generated frames, with their graph
    assert torch.equal(out.latents[:, 1:], raw[:, -(window - 1) :])
    # frame 0: decode the frames before them, take the last pixel frame, encode it again
    with torch.no_grad():
        pixels = vae.vae.decode(raw[:, : total - (window - 1)].permute(0, 2, 1, 3, 4)).sample.clamp(-1, 1)
        expected = vae.vae.encode(pixels[:, :, -1:]).latent_dist.mean.permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(out.latents[:, :1], expected, rtol=1e-5, atol=1e-5)
    # the mask excludes the first block of the window, element by element
    mask = out.gradient_mask
    assert mask.shape == out.latents.shape and mask.dtype == torch.bool
    assert not mask[:, :N].any() and mask[:, N:].all()
    # gradients reach the generator through the kept frames
    (out.latents * mask).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())


def test_long_rollout_without_vae_is_a_clear_error():
    _, _, runner = _rollout(window=6, max_frames=9)
    with pytest.raises(ValueError, match="VAE"):
        runner.run_generator({"prompt_embeds": _prompt()}, {"num_blocks": 3, "exit_steps": [0, 0, 0]})


def test_image_latent_is_the_first_frame_with_independent_first_frame():
    gen, pipe, runner = _rollout(window=7, max_frames=7, iff=True)
    image = torch.randn(2, 1, C, H, W)
    g = torch.Generator().manual_seed(0)
    shared = runner.sample_shared(2, g)
    assert len(shared["exit_steps"]) == shared["num_blocks"] + 1  # [1, N, N] without an image
    out = runner.run_generator({"prompt_embeds": _prompt(), "image_latent": image}, shared)
    assert out.latents.shape == (2, 7, C, H, W)
    assert torch.equal(out.latents[:, :1], image)
    assert pipe.calls[0]["noise"].shape[1] == 6
    assert len(pipe.calls[0]["exit_steps"]) == 2
    # without an image the same shared draw makes 7 frames from noise
    out = runner.run_generator({"prompt_embeds": _prompt()}, shared)
    assert out.latents.shape == (2, 7, C, H, W) and pipe.calls[1]["noise"].shape[1] == 7


def test_image_latent_needs_independent_first_frame():
    _, _, runner = _rollout(window=6, max_frames=6)
    batch = {"prompt_embeds": _prompt(), "image_latent": torch.randn(2, 1, C, H, W)}
    with pytest.raises(ValueError, match="independent_first_frame"):
        runner.run_generator(batch, {"num_blocks": 2, "exit_steps": [0, 0]})


def test_bad_window_and_missing_keys_are_named():
    gen = _generator()
    pipe = SelfForcingTrainingPipeline(gen, gen.scheduler, [1000.0, 500.0], N, num_max_frames=6)
    with pytest.raises(ValueError, match=r"image_or_video_shape\[1\]=5"):
        SelfForcingGenerator(pipe, [1, 5, C, H, W], N)
    runner = SelfForcingGenerator(pipe, [1, 6, C, H, W], N)
    with pytest.raises(KeyError, match="prompt_embeds"):
        runner.run_generator({}, {"num_blocks": 2, "exit_steps": [0, 0]})
    with pytest.raises(KeyError, match="num_blocks"):
        runner.run_generator({"prompt_embeds": _prompt()}, {})


# ----------------------------------------------------------------------------------------------
# factory and roles
# ----------------------------------------------------------------------------------------------
def test_factory_names_and_errors():
    assert set(OBJECTIVES) == {"dmd", "sid", "gan", "ode", "diffusion", "causvid", "teacher_regression"}
    with pytest.raises(KeyError, match="dmd"):
        build_objective("dmdd")
    gen = _generator()
    with pytest.raises(TypeError, match="ODERegression.*guidance_scale"):
        build_objective("ode", gen, denoising_step_list=[1000, 0], guidance_scale=3.0)


def test_dmd_freezes_real_score_and_exposes_roles():
    gen = _generator()
    sched = gen.scheduler
    real = WanDiffusionWrapper(WanModel(TINY), sched)
    fake = WanDiffusionWrapper(WanModel(TINY), sched)
    rollout = SelfForcingGenerator.build(gen, sched, image_or_video_shape=[1, 6, C, H, W])
    obj = build_objective("dmd", gen, real, fake, sched, rollout=rollout)
    assert obj.rollout is rollout
    assert isinstance(obj, DMD)
    assert not any(p.requires_grad for p in real.parameters())
    assert all(p.requires_grad for p in fake.parameters())
    assert obj.trainable_modules() == {"generator": gen, "critic": fake}
    assert obj.roles == ("generator", "critic")
