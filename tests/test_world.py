"""The shapes world's pieces against independent references: the codec is lossless, the text encoder
is a fixed table, the exact teacher is the posterior mean written out here with torch.distributions,
its ODE reproduces the data, and the base-model objective is the formula written out here."""

import math

import pytest
import torch
from torch.distributions import Normal

from pipeline.bidirectional_inference import BidirectionalSampler
from utils.scheduler import FlowMatchScheduler
from world.codec import WorldCodec
from world.render import (
    SHADES,
    Prompt,
    all_prompts,
    clips_of,
    render,
    render_prompt,
    split_prompts,
    trajectory,
)
from world.teacher import ExactTeacher
from world.text import VOCABULARY, WorldTextEncoder


@pytest.fixture(scope="module")
def encoder():
    return WorldTextEncoder()


@pytest.fixture(scope="module")
def teacher(encoder):
    return ExactTeacher(encoder)


def test_world_rules():
    prompts = all_prompts()
    assert len(prompts) == 64 and len({p.text for p in prompts}) == 64
    train, heldout = split_prompts()
    assert len(train) == 54 and len(heldout) == 10 and not set(train) & set(heldout)
    for attr in ("colour", "shape", "direction", "speed"):
        assert {getattr(p, attr) for p in train} == {getattr(p, attr) for p in prompts}
    # bounce: slow right from x=7 reaches the wall (x=13) at frame 6 and comes back
    xs = [x for _, x in trajectory(Prompt("red", "square", "right", "slow"), 10)]
    assert xs == [7, 8, 9, 10, 11, 12, 13, 12, 11, 10]
    video = render(clips_of(Prompt("blue", "circle", "up", "fast"))[2], 5)
    assert video.shape == (5, 3, 16, 16)
    assert torch.allclose(video[0, :, 0, 0], torch.full((3,), SHADES[2] * 2 - 1))
    with pytest.raises(ValueError, match="unknown word 'purple'"):
        Prompt.parse("a purple square moving left fast")


def test_codec_is_lossless_and_streams():
    codec = WorldCodec()
    videos = render_prompt(all_prompts()[3], 7)  # [3, F, 3, 16, 16]
    latents = codec.encode(videos.transpose(1, 2))
    assert latents.shape == (3, 7, 48, 4, 4)
    # pixel-unshuffle: channel c*16 + i*4 + j of latent (y, x) is pixel (c, 4y + i, 4x + j)
    assert latents[1, 2, 1 * 16 + 2 * 4 + 3, 3, 0] == videos[1, 2, 1, 14, 3]
    assert torch.equal(codec.decode(latents), videos)
    stream = codec.stream_decoder()
    assert torch.equal(torch.cat([stream.decode(latents[:, :3]), stream.decode(latents[:, 3:])], 1), videos)


def test_text_encoder(encoder):
    out = encoder(["a red square moving left fast", ""])["prompt_embeds"]
    assert out.shape == (2, 8, 32)
    assert torch.equal(out[0, 1], encoder.table[VOCABULARY.index("red")])
    assert out[0, 6:].abs().sum() == 0 and out[1].abs().sum() == 0
    assert torch.equal(
        WorldTextEncoder()(["a red square"])["prompt_embeds"], encoder(["a red square"])["prompt_embeds"]
    )
    with pytest.raises(ValueError, match="'purple'"):
        encoder(["a purple square"])


def _posterior_mean_reference(x_t, sigma, clips):
    """E[x0 | x_t] for x0 uniform over `clips`, x_t ~ N((1 - s) x0, s^2): Bayes' rule term by term."""
    logp = torch.stack([Normal((1 - sigma) * c.double(), sigma).log_prob(x_t.double()).sum() for c in clips])
    w = torch.softmax(logp, 0)
    return sum(wi * c.double() for wi, c in zip(w, clips, strict=True))


@pytest.mark.parametrize("t", [50.0, 400.0, 800.0, 990.0])
def test_exact_teacher_is_the_posterior_mean(teacher, encoder, t):
    prompts = all_prompts()
    p = prompts[17]
    codec = WorldCodec()
    clips = codec.encode(render_prompt(p, 6).transpose(1, 2))
    every = codec.encode(torch.cat([render_prompt(q, 6) for q in prompts]).transpose(1, 2))
    g = torch.Generator().manual_seed(int(t))
    x_t = (1 - t / 1000) * clips[1] + t / 1000 * torch.randn(clips[1].shape, generator=g)
    ctx = encoder([p.text, ""])["prompt_embeds"]
    flow, x0 = teacher(torch.stack([x_t, x_t]), torch.full((2,), t), ctx)
    want_c = _posterior_mean_reference(x_t, t / 1000, clips)
    want_u = _posterior_mean_reference(x_t, t / 1000, every)
    assert torch.allclose(x0[0].double(), want_c, atol=1e-4)
    assert torch.allclose(x0[1].double(), want_u, atol=1e-4)
    assert torch.allclose(flow[0].double(), (x_t.double() - want_c) / (t / 1000), atol=1e-3)


def test_exact_teacher_rejects_unknown_context(teacher):
    with pytest.raises(ValueError, match="matches no shapes-world prompt"):
        teacher(torch.zeros(1, 2, 48, 4, 4), torch.tensor([500.0]), torch.randn(1, 8, 32))


def test_exact_ode_reproduces_the_data(teacher, encoder):
    """The probability-flow ODE of the exact denoiser, 48 Euler steps: every endpoint is a real clip."""
    prompts = all_prompts()[:4]
    sampler = BidirectionalSampler(teacher, shift=5.0, num_steps=48, guidance_scale=1.0)
    noise = torch.randn(4, 12, 48, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sampler.sample(noise, encoder([p.text for p in prompts])["prompt_embeds"]).latents
    codec = WorldCodec()
    for i, p in enumerate(prompts):
        clips = codec.encode(render_prompt(p, 12).transpose(1, 2))
        rmse = ((out[i][None] - clips) ** 2).mean(dim=(1, 2, 3, 4)).sqrt()
        assert rmse.min() < 0.02, rmse


@pytest.mark.parametrize("loss_type", ["flow", "x0"])
def test_teacher_regression_loss_is_the_formula(teacher, encoder, loss_type):
    from model import TeacherRegression
    from wan import CausalWanModel, WanConfig, WanDiffusionWrapper

    from .wan_helpers import randomize_

    sched = FlowMatchScheduler(shift=5.0)
    net = randomize_(CausalWanModel(WanConfig.preset("world"), num_frame_per_block=6))
    gen = WanDiffusionWrapper(net, sched)
    obj = TeacherRegression(gen, teacher, sched, num_frame_per_block=6, denoising_loss_type=loss_type)
    p = all_prompts()[5]
    clean = WorldCodec().encode(render_prompt(p, 6).transpose(1, 2))[:2]
    batch = {"clean_latent": clean, "prompt_embeds": encoder([p.text] * 2)["prompt_embeds"]}
    torch.manual_seed(3)
    loss, _ = obj.generator_loss(batch, {})
    # the same draws, in the objective's order: timesteps (one per chunk) then noise
    torch.manual_seed(3)
    t = obj.sample_timesteps(2, 6, clean.device)
    noisy = sched.add_noise(clean, torch.randn_like(clean), t)
    with torch.no_grad():
        v_teacher, _ = teacher(noisy, t, batch["prompt_embeds"])
        v_student, _ = gen(noisy, t, batch["prompt_embeds"])
    per_frame = ((v_student - v_teacher) ** 2).mean(dim=(2, 3, 4))
    if loss_type == "flow":
        want = (sched.training_weight(t) * per_frame).mean()
    else:  # the x0 error is sigma times the flow error (x0 = x_t - sigma v): sigma^2-weighted flow loss
        want = ((t / 1000.0) ** 2 * per_frame).mean()
    assert math.isclose(loss.item(), want.item(), rel_tol=1e-4)
    with pytest.raises(ValueError, match="denoising_loss_type"):
        TeacherRegression(gen, teacher, sched, denoising_loss_type="eps")
