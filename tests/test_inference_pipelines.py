"""Causal inference pipelines: few-step (against the spec §4/§8.2 loop written out in test_rollout),
streaming against whole-video inference and a full VAE decode, cache reuse, rolling windows, and the
many-step CFG sampler against Euler / UniPC loops written out here."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler

from pipeline import CausalDiffusionInferencePipeline, CausalInferencePipeline
from tests.test_rollout import (
    HW,
    STEPS,
    TINY,
    N,
    assert_close,
    make_generator,
    make_inputs,
    record_calls,
    reference_rollout,
    rng,
)
from utils.scheduler import FlowMatchScheduler
from wan import CrossAttentionCache, KVCache
from wan.vae import WanVAE

K = len(STEPS)


def few_step(gen, **kw) -> CausalInferencePipeline:
    return CausalInferencePipeline(gen, FlowMatchScheduler(shift=5.0), STEPS, N, **kw)


@pytest.fixture(scope="module")
def tiny_vae() -> WanVAE:
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=TINY.in_dim,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * TINY.in_dim,
        latents_std=[1.0] * TINY.in_dim,
    )
    return WanVAE(vae)


# ----------------------------------------------------------------------------------------------
# Few-step pipeline
# ----------------------------------------------------------------------------------------------
LAYOUTS = {
    # name: (batch, noise frames, pipeline kwargs, initial frames, init layout, generated layout)
    "plain_batch2": (2, 6, {}, 0, (), [2, 2, 2]),
    "independent_first_frame": (1, 5, {"independent_first_frame": True}, 0, (), [1, 2, 2]),
    "initial_latent": (2, 4, {"context_noise": 30.0}, 1, (1,), [2, 2]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_inference_matches_reference_and_call_pattern(layout):
    batch, frames, kw, f_in, init_sizes, sizes = LAYOUTS[layout]
    gen = make_generator()
    pipe = few_step(gen, **kw)
    noise, cond = make_inputs(batch, frames)
    initial = make_inputs(batch, f_in, seed=5)[0] if f_in else None
    calls, handle = record_calls(gen)
    out = pipe.inference(noise, cond, initial_latent=initial, generator=rng())
    handle.remove()
    with torch.no_grad():
        ref = reference_rollout(
            gen.model,
            STEPS,
            noise,
            cond["prompt_embeds"],
            sizes,
            [K - 1] * len(sizes),
            rng=rng(),
            context_noise=kw.get("context_noise", 0.0),
            initial=initial,
            init_sizes=init_sizes,
        )
    assert_close(out.latents, ref, rtol=1e-6)
    assert out.videos is None
    # every call without grad: initial latent at t=0, K steps per block, refresh after all but the last
    ctx_t = kw.get("context_noise", 0.0)
    expected, pos = [], 0
    for n in init_sizes:
        expected.append((pos, n, 0.0, False))
        pos += n
    for b, n in enumerate(sizes):
        expected += [(pos, n, pytest.approx(float(STEPS[k])), False) for k in range(K)]
        if b + 1 < len(sizes):
            expected.append((pos, n, pytest.approx(ctx_t), False))
        pos += n
    assert calls == expected


def test_trailing_zero_is_dropped():
    gen = make_generator()
    noise, cond = make_inputs(1, 4)
    with_zero = CausalInferencePipeline(gen, FlowMatchScheduler(shift=5.0), [*STEPS.tolist(), 0.0], N)
    calls, handle = record_calls(gen)
    a = with_zero.inference(noise, cond, generator=rng()).latents
    handle.remove()
    # K denoising calls per block and one refresh (at t=0) between the two blocks: no step at t=0
    assert len(calls) == 2 * K + 1 and [t for _, _, t, _ in calls].count(0.0) == 1
    assert torch.equal(a, few_step(gen).inference(noise, cond, generator=rng()).latents)


@pytest.mark.parametrize("f_in, iff", [(0, False), (0, True), (1, False)])
def test_stream_concatenation_equals_inference(f_in, iff):
    gen = make_generator()
    pipe = few_step(gen, independent_first_frame=iff)
    noise, cond = make_inputs(2, 5 if iff else 6)
    initial = make_inputs(2, f_in, seed=5)[0] if f_in else None
    blocks = list(pipe.stream(noise, cond, initial_latent=initial, generator=rng()))
    whole = pipe.inference(noise, cond, initial_latent=initial, generator=rng()).latents
    assert torch.equal(torch.cat([b.latents for b in blocks], dim=1), whole)
    starts = [0]
    for b in blocks[:-1]:
        starts.append(starts[-1] + b.latents.shape[1])
    assert [b.start_frame for b in blocks] == starts
    assert all(b.frames is None and b.latency_s >= 0 for b in blocks)


def test_stream_yields_each_block_before_refreshing_the_cache():
    gen = make_generator()
    pipe = few_step(gen)
    noise, cond = make_inputs(1, 6)
    calls, handle = record_calls(gen)
    seen = [len(calls) for _ in pipe.stream(noise, cond, generator=rng())]
    handle.remove()
    # block b is handed over after its K steps; its refresh runs only when the next block is asked for
    assert seen == [K, 2 * K + 1, 3 * K + 2]


def test_streamed_frames_equal_full_decode(tiny_vae):
    gen = make_generator()
    pipe = few_step(gen, vae=tiny_vae)
    noise, cond = make_inputs(1, 6)
    blocks = list(pipe.stream(noise, cond, generator=rng()))
    latents = torch.cat([b.latents for b in blocks], dim=1)
    streamed = torch.cat([b.frames for b in blocks], dim=1)
    full = tiny_vae.decode(latents)
    s = tiny_vae.spatial_compression
    assert streamed.shape == (1, 1 + 4 * (6 - 1), 3, HW[0] * s, HW[1] * s)
    assert_close(streamed, full, rtol=1e-5)
    out = pipe.inference(noise, cond, generator=rng())
    assert torch.equal(out.latents, latents)
    assert_close(out.videos, full, rtol=1e-5)


def test_caches_are_reused_across_calls_and_reallocated_on_shape_change():
    gen = make_generator()
    pipe = few_step(gen)
    noise, cond = make_inputs(1, 6)
    first = pipe.inference(noise, cond, generator=rng()).latents
    kv = pipe._caches._caches.kv
    other_noise, other_cond = make_inputs(1, 6, seed=9)
    pipe.inference(other_noise, other_cond, generator=rng())  # a different prompt in between
    again = pipe.inference(noise, cond, generator=rng()).latents
    assert pipe._caches._caches.kv is kv  # reset, not reallocated
    assert torch.equal(first, again)
    noise2, cond2 = make_inputs(2, 4, seed=3)
    batch2 = pipe.inference(noise2, cond2, generator=rng()).latents
    assert pipe._caches._caches.kv is not kv
    assert torch.equal(batch2, few_step(gen).inference(noise2, cond2, generator=rng()).latents)


def test_rolling_window_generates_past_the_cache():
    gen = make_generator(local_attn_size=4, sink_size=1)
    pipe = few_step(gen, num_max_frames=6)
    noise, cond = make_inputs(1, 12)
    out = pipe.inference(noise, cond, generator=rng()).latents
    with torch.no_grad():
        ref = reference_rollout(
            gen.model, STEPS, noise, cond["prompt_embeds"], [N] * 6, [K - 1] * 6, rng=rng()
        )
    assert_close(out, ref, rtol=1e-6)
    # causal: the first frames do not depend on how long the video goes on
    short = pipe.inference(noise[:, :6], cond, generator=rng()).latents
    assert torch.equal(out[:, :6], short)


def test_past_the_cache_without_window_is_a_clear_error():
    pipe = few_step(make_generator(), num_max_frames=6)
    noise, cond = make_inputs(1, 8)
    with pytest.raises(ValueError, match="num_max_frames=6"):
        pipe.inference(noise, cond)
    with pytest.raises(ValueError, match="num_max_frames=6"):
        next(pipe.stream(noise, cond))


# ----------------------------------------------------------------------------------------------
# Many-step CFG pipeline
# ----------------------------------------------------------------------------------------------
SHIFT = 3.0
NUM_STEPS = 5


def euler_solver():
    # sigma_i = S(1 - i/n) with S the SD3 shift, ending at 0; x <- x + v * (sigma_next - sigma)
    lin = [1 - i / NUM_STEPS for i in range(NUM_STEPS)] + [0.0]
    sigmas = [SHIFT * s / (1 + (SHIFT - 1) * s) for s in lin]
    state = {"i": 0}

    def step(flow, x):
        i = state["i"]
        state["i"] += 1
        return x + flow * (sigmas[i + 1] - sigmas[i])

    return [1000 * s for s in sigmas[:-1]], step


def unipc_solver():
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT)
    sched.set_timesteps(NUM_STEPS)
    timesteps = list(sched.timesteps)
    state = {"i": 0}

    def step(flow, x):
        t = timesteps[state["i"]]
        state["i"] += 1
        return sched.step(flow, t, x).prev_sample

    return [float(t) for t in timesteps], step


def reference_cfg(dit, noise, prompts, guidance, sizes, solver):
    """Per block a fresh solver; flows from one KV cache per prompt; u + g (c - u); refresh at t=0."""
    b, f, _, h, w = noise.shape
    caches = [(KVCache.for_model(dit, b, (h, w), f), CrossAttentionCache.for_model(dit)) for _ in prompts]

    def flow(x, t, embeds, cache, start):
        tt = torch.full(x.shape[:2], float(t))
        return dit(
            x.transpose(1, 2),
            tt,
            embeds,
            kv_cache=cache[0],
            crossattn_cache=cache[1],
            current_start_frame=start,
        ).transpose(1, 2)

    outs, pos = [], 0
    for i, n in enumerate(sizes):
        x = noise[:, pos : pos + n]
        timesteps, step = solver()
        for t in timesteps:
            flows = [flow(x, t, e, c, pos) for e, c in zip(prompts, caches)]
            v = flows[0] if len(flows) == 1 else flows[1] + guidance * (flows[0] - flows[1])
            x = step(v, x)
        outs.append(x)
        if i + 1 < len(sizes):
            for e, c in zip(prompts, caches):
                flow(x, 0.0, e, c, pos)
        pos += n
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize(
    "sampler, guidance", [("euler", 1.0), ("euler", 3.0), ("unipc", 1.0), ("unipc", 4.0)]
)
def test_diffusion_pipeline_matches_reference_loop(sampler, guidance):
    gen = make_generator()
    pipe = CausalDiffusionInferencePipeline(
        gen,
        SHIFT,
        num_inference_steps=NUM_STEPS,
        guidance_scale=guidance,
        num_frame_per_block=N,
        sampler=sampler,
    )
    noise, cond = make_inputs(2, 6)
    _, uncond = make_inputs(2, 6, seed=11, text_len=5)
    calls, handle = record_calls(gen)
    out = pipe.inference(noise, cond, uncond).latents
    handle.remove()
    prompts = [cond["prompt_embeds"]] + ([uncond["prompt_embeds"]] if guidance != 1.0 else [])
    # guidance 1 never evaluates the negative prompt
    assert len(calls) == len(prompts) * (3 * NUM_STEPS + 2)
    with torch.no_grad():
        ref = reference_cfg(
            gen.model, noise, prompts, guidance, [N] * 3, euler_solver if sampler == "euler" else unipc_solver
        )
    assert_close(out, ref, rtol=1e-5)
    again = pipe.inference(noise, cond, uncond).latents
    assert torch.equal(out, again)


def test_diffusion_pipeline_needs_a_negative_prompt_for_cfg():
    pipe = CausalDiffusionInferencePipeline(
        make_generator(), SHIFT, NUM_STEPS, guidance_scale=3.0, num_frame_per_block=N
    )
    noise, cond = make_inputs(1, 2)
    with pytest.raises(ValueError, match="unconditional_dict"):
        pipe.inference(noise, cond)


def test_diffusion_pipeline_stream_and_initial_latent():
    gen = make_generator()
    pipe = CausalDiffusionInferencePipeline(
        gen, SHIFT, NUM_STEPS, guidance_scale=2.0, num_frame_per_block=N, sampler="euler"
    )
    noise, cond = make_inputs(1, 4)
    _, uncond = make_inputs(1, 4, seed=11)
    initial = make_inputs(1, 1, seed=5)[0]
    whole = pipe.inference(noise, cond, uncond, initial_latent=initial).latents
    blocks = list(pipe.stream(noise, cond, uncond, initial_latent=initial))
    assert [b.start_frame for b in blocks] == [0, 1, 3]
    assert torch.equal(torch.cat([b.latents for b in blocks], dim=1), whole)
    assert torch.equal(whole[:, :1], initial)
