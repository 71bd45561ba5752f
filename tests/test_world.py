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
from world.network import NETWORK
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


def _posterior_reference(x_t, sigma, clips):
    """(E[x0 | x_t], posterior weights) for x0 uniform over `clips`, x_t ~ N((1 - s) x0, s^2) with
    s = `sigma` (a number, or one per frame `[F]`): Bayes' rule term by term, in float64."""
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
    logp = torch.stack([Normal((1 - s) * c.double(), s).log_prob(x_t.double()).sum() for c in clips])
    w = torch.softmax(logp, 0)
    return sum(wi * c.double() for wi, c in zip(w, clips, strict=True)), w


def _posterior_mean_reference(x_t, sigma, clips):
    return _posterior_reference(x_t, sigma, clips)[0]


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


def _mixed_batch(encoder, num_frames, seed):
    """Conditional rows of two prompts and unconditional rows, interleaved, each noised from a clip
    with its own per-frame noise level: (prompt per row (None: empty), x_t, t [B, F], context)."""
    prompts = all_prompts()
    rows = [prompts[17], None, prompts[3], None, None, prompts[29], prompts[17], None]
    g = torch.Generator().manual_seed(seed)
    codec = WorldCodec()
    x_t, ts = [], []
    for i, p in enumerate(rows):
        source = codec.encode(render_prompt(p or prompts[40], num_frames).transpose(1, 2))[i % 3]
        t = 900 + 95 * torch.rand(num_frames, generator=g)  # high noise: the clips' weights mix
        s = (t / 1000).reshape(-1, 1, 1, 1)
        x_t.append((1 - s) * source + s * torch.randn(source.shape, generator=g))
        ts.append(t)
    ctx = encoder([p.text if p else "" for p in rows])["prompt_embeds"]
    return rows, torch.stack(x_t), torch.stack(ts), ctx


@pytest.mark.parametrize("chunk", [1, None], ids=["one_row_per_chunk", "default_chunks"])
def test_exact_teacher_mixed_batch_per_frame_sigma(teacher, encoder, monkeypatch, chunk):
    """Conditional and unconditional rows in one batch, per-frame noise levels: every row is the
    posterior mean over its own prompt's clips (every clip for the empty prompt)."""
    import world.teacher

    if chunk is not None:
        monkeypatch.setattr(world.teacher, "UNCOND_CHUNK_ELEMENTS", chunk)
    codec = WorldCodec()
    rows, x_t, t, ctx = _mixed_batch(encoder, 4, seed=1)
    every = codec.encode(torch.cat([render_prompt(q, 4) for q in all_prompts()]).transpose(1, 2))
    flow, x0 = teacher(x_t, t, ctx)
    for i, p in enumerate(rows):
        clips = every if p is None else codec.encode(render_prompt(p, 4).transpose(1, 2))
        want, weights = _posterior_reference(x_t[i], t[i] / 1000, clips)
        assert weights.max() < 0.99, i  # the weights mix: a nearest-clip shortcut would miss by > atol
        assert torch.allclose(x0[i].double(), want, atol=1e-4), i
        want_flow = (x_t[i].double() - want) / (t[i].double() / 1000).reshape(-1, 1, 1, 1)
        assert torch.allclose(flow[i].double(), want_flow, atol=1e-3), i


def test_exact_teacher_is_differentiable_in_x_t(teacher, encoder):
    """SiD backpropagates through the real score: d<x0, r>/dx_t matches the float64 reference's."""
    codec = WorldCodec()
    rows, x_t, t, ctx = _mixed_batch(encoder, 2, seed=2)
    rows, x_t, t, ctx = rows[:2], x_t[:2], t[:2], ctx[:2]  # one conditional, one unconditional row
    every = codec.encode(torch.cat([render_prompt(q, 2) for q in all_prompts()]).transpose(1, 2))
    r = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(5))
    x = x_t.clone().requires_grad_(True)
    (teacher(x, t, ctx)[1] * r).sum().backward()
    for i, p in enumerate(rows):
        clips = every if p is None else codec.encode(render_prompt(p, 2).transpose(1, 2))
        xi = x_t[i].double().requires_grad_(True)
        (_posterior_mean_reference(xi, t[i] / 1000, clips) * r[i].double()).sum().backward()
        assert xi.grad.abs().max() > 1e-3  # a non-trivial gradient to compare
        assert torch.allclose(x.grad[i].double(), xi.grad, rtol=1e-3, atol=1e-4), i


def test_prompt_index_matches_each_row_in_one_batch(teacher, encoder):
    prompts = all_prompts()
    ctx = encoder([prompts[5].text, "", prompts[63].text, prompts[0].text, "", prompts[17].text])
    want = [5, -1, 63, 0, -1, 17]
    assert teacher.prompt_index(ctx["prompt_embeds"]).tolist() == want
    # bf16 embeddings (mixed precision) and a context cut after the prompts' 6 words still match
    assert teacher.prompt_index(ctx["prompt_embeds"].bfloat16()).tolist() == want
    assert ctx["prompt_embeds"][:, 6:].abs().sum() == 0
    assert teacher.prompt_index(ctx["prompt_embeds"][:, :6]).tolist() == want


def test_exact_teacher_rejects_unknown_context(teacher, encoder):
    with pytest.raises(ValueError, match="matches no shapes-world prompt"):
        teacher(torch.zeros(1, 2, 48, 4, 4), torch.tensor([500.0]), torch.randn(1, 8, 32))
    # one unknown row in an otherwise valid batch is still the error
    ctx = encoder([all_prompts()[0].text, ""])["prompt_embeds"]
    ctx = torch.cat([ctx, torch.randn(1, 8, 32)])
    with pytest.raises(ValueError, match="matches no shapes-world prompt"):
        teacher(torch.zeros(3, 2, 48, 4, 4), torch.tensor([500.0] * 3), ctx)
    with pytest.raises(ValueError, match=r"context must be \[B, <= 8, 32\]"):
        teacher(torch.zeros(1, 2, 48, 4, 4), torch.tensor([500.0]), torch.randn(1, 9, 32))


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
    from wan import CausalWanModel, WanDiffusionWrapper

    from .wan_helpers import randomize_

    sched = FlowMatchScheduler(shift=5.0)
    net = randomize_(CausalWanModel(NETWORK, num_frame_per_block=6))
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


def test_random_start_clips_start_along_their_path_heading_as_asked():
    """With random_start every prompt has 8 starts x 3 shades: the object starts at each STARTS position
    on its axis (the other coordinate at the centre), its first step goes the asked way at the asked
    speed, and every clip of the world is distinct (so a clip tells its prompt and start apart)."""
    from world.render import DIRECTIONS, SPEEDS, START, STARTS

    assert STARTS == (4, 5, 6, 7, 8, 9, 10, 11) and START in STARTS
    videos = {}
    for prompt in all_prompts():
        clips = clips_of(prompt, random_start=True)
        assert [(c.shade, c.start) for c in clips] == [(s, p) for s in range(3) for p in STARTS]
        dy, dx = DIRECTIONS[prompt.direction]
        v = SPEEDS[prompt.speed]
        for clip in clips:
            path = trajectory(prompt, 12, clip.start)
            y0, x0 = path[0]
            assert (y0, x0) == ((clip.start, START) if dy else (START, clip.start))
            assert (path[1][0] - y0, path[1][1] - x0) == (dy * v, dx * v)  # no bounce on the first step
            videos[(prompt, clip.shade, clip.start)] = render(clip, 12)
        # the default world is the centre-start subset, in shade order
        assert clips_of(prompt) == [c for c in clips if c.start == START]
    flat = torch.stack(list(videos.values())).flatten(1)
    assert len(flat) == 64 * 24
    assert torch.cdist(flat, flat).add(torch.eye(len(flat)) * 1e9).min() > 0  # no two clips alike


def test_random_start_teacher_is_the_posterior_mean_over_every_start(encoder):
    """The random-start teacher's x0 is the softmax-weighted mean over the prompt's 24 clips, written out
    here from the Gaussian log-likelihoods; nearly clean, it returns the clip the noise came from,
    starts away from the centre included (which the default teacher cannot)."""
    prompt = all_prompts()[9]
    teacher = ExactTeacher(encoder, random_start=True)
    codec = WorldCodec()
    clips = codec.encode(render_prompt(prompt, 6, random_start=True).transpose(1, 2))  # [24, F, C, h, w]
    assert clips.shape[0] == 24
    ctx = encoder([prompt.text] * 2)["prompt_embeds"]
    g = torch.Generator().manual_seed(3)
    x_t = 0.4 * clips[[5, 20]] + 0.6 * torch.randn(clips[:2].shape, generator=g)
    t = torch.full((2,), 600.0)
    logp = Normal(0.4 * clips[None], 0.6).log_prob(x_t[:, None]).flatten(2).sum(-1)  # [2, 24]
    want = (torch.softmax(logp.double(), 1) @ clips.flatten(1).double()).view(x_t.shape)
    _, x0 = teacher(x_t, t, ctx)
    torch.testing.assert_close(x0.double(), want, rtol=1e-4, atol=1e-4)
    near = 0.999 * clips[[5, 20]] + 0.001 * torch.randn(clips[:2].shape, generator=g)
    _, x0 = teacher(near, torch.full((2,), 1.0), ctx)
    torch.testing.assert_close(x0, clips[[5, 20]], rtol=0, atol=1e-4)
    _, x0_centre = ExactTeacher(encoder)(near, torch.full((2,), 1.0), ctx)
    assert (x0_centre - clips[[5, 20]]).abs().amax() > 0.5  # clips 5 and 20 do not start at the centre
