"""Self-Forcing training rollout: what runs with grad, values and gradients against a reference
written out here from spec §4 (DiT + KV cache driven by hand), finite differences with the no-grad
parts frozen, layouts and the Appendix A timestep bookkeeping."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pipeline import CausalInferencePipeline, SelfForcingTrainingPipeline
from pipeline.common import plan_blocks
from tests.wan_helpers import randomize_
from utils.scheduler import FlowMatchScheduler
from wan import CausalWanModel, CrossAttentionCache, KVCache, WanConfig, WanDiffusionWrapper

TINY = WanConfig.preset("tiny")
HW = (4, 6)
N = 2
UNWARPED = [1000, 750, 500, 250]
STEPS = FlowMatchScheduler(shift=5.0).warp(UNWARPED)  # [1000, 937.5, 833.3, 625]


def make_generator(seed: int = 0, n: int = N, **model_kw) -> WanDiffusionWrapper:
    model = randomize_(CausalWanModel(TINY, num_frame_per_block=n, **model_kw), seed=seed)
    return WanDiffusionWrapper(model, FlowMatchScheduler(shift=5.0))


def make_pipeline(gen, steps=STEPS, n=N, max_frames=16, **kw) -> SelfForcingTrainingPipeline:
    return SelfForcingTrainingPipeline(
        gen, FlowMatchScheduler(shift=5.0), steps, n, num_max_frames=max_frames, **kw
    )


def make_inputs(batch: int, frames: int, seed: int = 0, text_len: int = 7):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, frames, TINY.in_dim, *HW, generator=g)
    embeds = torch.randn(batch, text_len, TINY.text_dim, generator=g)
    return noise, {"prompt_embeds": embeds}


def rng(seed: int = 123) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Reference: spec §4 written out with the DiT and its caches, x0 = x - sigma*v and
# x_t = (1 - sigma)*x0 + sigma*eps spelled out. Fresh noise order: one draw per re-noising, then one
# for the context refresh when context_noise > 0; no refresh after the last block.
# ----------------------------------------------------------------------------------------------
def reference_rollout(
    dit,
    steps,
    noise,
    embeds,
    sizes,
    exits,
    *,
    rng=None,
    context_noise=0.0,
    initial=None,
    init_sizes=(),
    grad_from=0,
):
    b, f, _, h, w = noise.shape
    f_in = 0 if initial is None else initial.shape[1]
    kv = KVCache.for_model(dit, b, (h, w), f_in + f, dtype=noise.dtype)
    xc = CrossAttentionCache.for_model(dit)

    def x0_of(x, t, start):
        tt = torch.full(x.shape[:2], float(t))
        v = dit(x.transpose(1, 2), tt, embeds, kv_cache=kv, crossattn_cache=xc, current_start_frame=start)
        return x - float(t) / 1000 * v.transpose(1, 2)

    def eps(like):
        return torch.randn(like.shape, generator=rng, dtype=like.dtype)

    outs, pos = [], 0
    if initial is not None:
        with torch.no_grad():
            for n in init_sizes:
                x0_of(initial[:, pos : pos + n], 0.0, pos)
                pos += n
        outs.append(initial)
    off = 0
    for i, (n, e) in enumerate(zip(sizes, exits)):
        x = noise[:, off : off + n]
        with torch.no_grad():
            for k in range(e):
                x0 = x0_of(x, steps[k], pos)
                s = float(steps[k + 1]) / 1000
                x = (1 - s) * x0 + s * eps(x0)
        with torch.set_grad_enabled(torch.is_grad_enabled() and pos >= grad_from):
            x0 = x0_of(x, steps[e], pos)
        outs.append(x0)
        if i + 1 < len(sizes):
            with torch.no_grad():
                ctx = x0.detach()
                if context_noise > 0:
                    s = context_noise / 1000
                    ctx = (1 - s) * ctx + s * eps(ctx)
                x0_of(ctx, context_noise, pos)
        pos, off = pos + n, off + n
    return torch.cat(outs, dim=1)


def grads(module: nn.Module) -> torch.Tensor:
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in module.parameters()]
    )


def loss_weights(shape, seed=7):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def assert_close(a, b, rtol=1e-4):
    scale = max(1.0, b.abs().max().item())
    assert (a - b).abs().max().item() <= rtol * scale, (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------
# What runs with grad
# ----------------------------------------------------------------------------------------------
def record_calls(gen):
    calls = []

    def hook(module, args, kwargs, output):
        x, t = args[0], args[1]
        calls.append(
            (kwargs["current_start_frame"], x.shape[1], float(t.flatten()[0]), torch.is_grad_enabled())
        )

    return calls, gen.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize(
    "exits, same",
    [([0, 0, 0], True), ([3, 3, 3], True), ([2, 2, 2], True), ([0, 3, 1], False), ([2, 0, 3], False)],
)
def test_exactly_one_grad_evaluation_per_block(exits, same):
    gen = make_generator()
    pipe = make_pipeline(gen, same_step_across_blocks=same, context_noise=20.0)
    noise, cond = make_inputs(1, 6)
    calls, handle = record_calls(gen)
    out = pipe.inference_with_trajectory(noise, cond, exits, generator=rng())
    handle.remove()
    # the call sequence, element by element: steps 0..exit (only the exit with grad), then the refresh
    expected = []
    for b, e in enumerate(exits):
        start = b * N
        expected += [(start, N, pytest.approx(float(STEPS[k])), k == e) for k in range(e + 1)]
        if b + 1 < len(exits):
            expected.append((start, N, pytest.approx(20.0), False))
    assert calls == expected
    assert sum(c[3] for c in calls) == len(exits) == out.grad_evaluations
    assert out.exit_steps == exits


def test_no_grad_mode_gives_no_grad_evaluations():
    pipe = make_pipeline(make_generator())
    noise, cond = make_inputs(1, 4)
    with torch.no_grad():
        out = pipe.inference_with_trajectory(noise, cond, [1, 1], generator=rng())
    assert out.grad_evaluations == 0 and not out.latents.requires_grad


# ----------------------------------------------------------------------------------------------
# Values and gradients against the reference
# ----------------------------------------------------------------------------------------------
CASES = {
    # name: (batch, noise frames, exits, pipeline kwargs, initial latent frames, init layout, gen layout)
    "exit0": (1, 6, [0, 0, 0], {}, 0, (), [2, 2, 2]),
    "exit_last": (1, 6, [3, 3, 3], {}, 0, (), [2, 2, 2]),
    "mixed_batch2_ctxnoise": (
        2,
        6,
        [1, 3, 0],
        {"same_step_across_blocks": False, "context_noise": 50.0},
        0,
        (),
        [2, 2, 2],
    ),
    "independent_first_frame": (1, 5, [2, 2, 2], {"independent_first_frame": True}, 0, (), [1, 2, 2]),
    "initial_latent": (2, 4, [1, 1], {}, 1, (1,), [2, 2]),
    "initial_latent_iff": (1, 4, [3, 3], {"independent_first_frame": True}, 1, (1,), [2, 2]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("checkpointing", [False, True])
def test_values_and_gradients_match_reference(case, checkpointing):
    batch, frames, exits, kw, f_in, init_sizes, sizes = CASES[case]
    gen = make_generator()
    gen.model.enable_gradient_checkpointing(checkpointing)
    pipe = make_pipeline(gen, **kw)
    noise, cond = make_inputs(batch, frames)
    initial = make_inputs(batch, f_in, seed=5)[0] if f_in else None
    out = pipe.inference_with_trajectory(noise, cond, exits, initial_latent=initial, generator=rng())
    assert out.latents.shape == (batch, f_in + frames, TINY.in_dim, *HW)
    w = loss_weights(out.latents.shape)
    (out.latents * w).sum().backward()
    ours = grads(gen)

    ref_gen = make_generator()  # same weights, fresh grads
    ref = reference_rollout(
        ref_gen.model,
        STEPS,
        noise,
        cond["prompt_embeds"],
        sizes,
        exits,
        rng=rng(),
        context_noise=kw.get("context_noise", 0.0),
        initial=initial,
        init_sizes=init_sizes,
    )
    assert_close(out.latents.detach(), ref.detach())
    if initial is not None:
        assert torch.equal(out.latents[:, :f_in], initial)
    (ref * w).sum().backward()
    assert_close(ours, grads(ref_gen))
    assert ours.abs().max() > 0


def test_gradient_checkpointing_on_and_off_give_the_same_gradients():
    results = []
    for ckpt in (False, True):
        gen = make_generator()
        gen.model.enable_gradient_checkpointing(ckpt)
        pipe = make_pipeline(gen, same_step_across_blocks=False)
        noise, cond = make_inputs(2, 6)
        out = pipe.inference_with_trajectory(noise, cond, [2, 0, 1], generator=rng())
        (out.latents * loss_weights(out.latents.shape)).sum().backward()
        results.append((out.latents.detach(), grads(gen)))
    assert torch.equal(results[0][0], results[1][0])
    assert_close(results[0][1], results[1][1], rtol=1e-5)


class FrozenContextGenerator(nn.Module):
    """Routes grad-enabled calls (the exit steps) to `exit_gen`; every no-grad call runs `base` on the
    input that call had in a recorded run. So the exit steps can be evaluated at a perturbed parameter
    while everything computed without grad (earlier steps, refreshes, hence the cache and the exit
    inputs) stays exactly as in the recorded run."""

    def __init__(
        self, base: WanDiffusionWrapper, exit_gen: WanDiffusionWrapper, recorded: list | None
    ) -> None:
        super().__init__()
        self.base = base
        self.exit_gen = exit_gen
        self.recording = recorded is None
        self.inputs = [] if recorded is None else list(recorded)

    @property
    def model(self):
        return self.base.model

    def forward(self, x, *args, **kwargs):
        if torch.is_grad_enabled():
            return self.exit_gen(x, *args, **kwargs)
        if self.recording:
            self.inputs.append(x.clone())
        else:
            x = self.inputs.pop(0)
        return self.base(x, *args, **kwargs)


ROLLING = {"local_attn_size": 4, "sink_size": 1}


FD_PARAMS = [
    ("model.blocks.0.self_attn.k.weight", (3, 5)),
    ("model.text_embedding.0.weight", (1, 2)),
    ("model.head.head.weight", (1, 2)),
]
FD_CASES = [
    pytest.param(name, idx, ckpt, {}, id=f"{name}-ckpt{int(ckpt)}")
    for name, idx in FD_PARAMS
    for ckpt in (False, True)
] + [
    pytest.param(*FD_PARAMS[0], False, ROLLING, id="rolling"),
    pytest.param(*FD_PARAMS[0], True, ROLLING, id="rolling-ckpt"),
]


@pytest.mark.parametrize("param_name, index, checkpointing, window", FD_CASES)
def test_gradient_equals_finite_differences_with_no_grad_parts_frozen(
    param_name, index, checkpointing, window
):
    """d(loss)/d(theta) must be the derivative through the exit-step evaluations only: perturbing the
    parameter in the exit steps alone, with every no-grad computation replayed unchanged, must reproduce
    it; perturbing it everywhere (the total derivative a context leak would approach) must not.
    The rolling case runs past num_max_frames so the ring buffer wraps."""
    gen = make_generator(**window)
    gen.model.enable_gradient_checkpointing(checkpointing)
    frames, exits = (10, [2, 1, 3, 0, 2]) if window else (6, [2, 1, 3])
    noise, cond = make_inputs(1, frames)
    w = loss_weights(noise.shape).double()

    def loss_of(generator):
        pipe = make_pipeline(
            generator, same_step_across_blocks=False, context_noise=40.0, max_frames=6 if window else 16
        )
        out = pipe.inference_with_trajectory(noise, cond, exits, generator=rng())
        return (out.latents.double() * w).sum()

    recorder = FrozenContextGenerator(gen, gen, None)
    loss_of(recorder).backward()
    analytic = dict(gen.named_parameters())[param_name].grad[index].item()

    def perturbed(delta):
        g = copy.deepcopy(gen)
        with torch.no_grad():
            dict(g.named_parameters())[param_name][index] += delta
        return g

    def frozen_loss(delta):
        return loss_of(FrozenContextGenerator(gen, perturbed(delta), recorder.inputs)).item()

    eps = 1e-2  # float32 network: central differences at 1e-2 are accurate to ~1e-4 relative here
    frozen = (frozen_loss(eps) - frozen_loss(-eps)) / (2 * eps)
    everywhere = (loss_of(perturbed(eps)).item() - loss_of(perturbed(-eps)).item()) / (2 * eps)
    assert analytic == pytest.approx(frozen, rel=2e-3, abs=1e-4)
    # the check has teeth: the total derivative is clearly different for this parameter
    assert abs(everywhere - analytic) > 10 * abs(frozen - analytic) + 1e-3


def test_blocks_before_gradient_from_frame_carry_no_gradient():
    gen = make_generator()
    pipe = make_pipeline(gen)
    noise, cond = make_inputs(1, 6)
    out = pipe.inference_with_trajectory(noise, cond, [1, 1, 1], gradient_from_frame=2, generator=rng())
    assert out.grad_evaluations == 2
    out.latents[:, :2].sum().backward()
    assert grads(gen).abs().max() == 0
    # the later blocks do carry it, and equal the reference with the same rule
    gen.zero_grad()
    out = pipe.inference_with_trajectory(noise, cond, [1, 1, 1], gradient_from_frame=2, generator=rng())
    w = loss_weights(out.latents.shape)
    (out.latents * w).sum().backward()
    ref_gen = make_generator()
    ref = reference_rollout(
        ref_gen.model, STEPS, noise, cond["prompt_embeds"], [2, 2, 2], [1, 1, 1], rng=rng(), grad_from=2
    )
    (ref * w).sum().backward()
    assert grads(gen).abs().max() > 0
    assert_close(grads(gen), grads(ref_gen))


# ----------------------------------------------------------------------------------------------
# Determinism, agreement with inference, batch independence
# ----------------------------------------------------------------------------------------------
def test_same_seed_same_rollout_and_different_seed_differs():
    pipe = make_pipeline(make_generator())
    noise, cond = make_inputs(1, 6)
    a = pipe.inference_with_trajectory(noise, cond, [2, 2, 2], generator=rng(1)).latents
    b = pipe.inference_with_trajectory(noise, cond, [2, 2, 2], generator=rng(1)).latents
    c = pipe.inference_with_trajectory(noise, cond, [2, 2, 2], generator=rng(2)).latents
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    torch.manual_seed(4)
    d = pipe.inference_with_trajectory(noise, cond, [2, 2, 2]).latents
    torch.manual_seed(4)
    assert torch.equal(d, pipe.inference_with_trajectory(noise, cond, [2, 2, 2]).latents)


@pytest.mark.parametrize("iff, f_in, frames", [(False, 0, 6), (True, 0, 5), (False, 1, 4)])
def test_last_step_only_equals_inference(iff, f_in, frames):
    gen = make_generator()
    train = make_pipeline(gen, last_step_only=True, independent_first_frame=iff, context_noise=30.0)
    infer = CausalInferencePipeline(
        gen, FlowMatchScheduler(shift=5.0), STEPS, N, independent_first_frame=iff, context_noise=30.0
    )
    noise, cond = make_inputs(2, frames)
    initial = make_inputs(2, f_in, seed=5)[0] if f_in else None
    blocks = len(train.block_sizes(frames, f_in))
    exits = train.sample_exit_steps(blocks)
    assert exits == [len(STEPS) - 1] * blocks
    rollout = train.inference_with_trajectory(noise, cond, exits, initial_latent=initial, generator=rng())
    video = infer.inference(noise, cond, initial_latent=initial, generator=rng())
    assert_close(rollout.latents.detach(), video.latents, rtol=1e-6)


def test_batch_samples_are_independent():
    # One denoising step: no fresh noise is drawn, so each sample alone must give the same result.
    pipe = make_pipeline(make_generator(), steps=STEPS[:1])
    noise, cond = make_inputs(2, 6)
    both = pipe.inference_with_trajectory(noise, cond, [0, 0, 0]).latents
    for i in range(2):
        alone = pipe.inference_with_trajectory(
            noise[i : i + 1], {"prompt_embeds": cond["prompt_embeds"][i : i + 1]}, [0, 0, 0]
        ).latents
        assert_close(both[i : i + 1].detach(), alone.detach(), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Bookkeeping
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "exit_index, expected", [(0, (1000, 750)), (1, (750, 500)), (2, (500, 250)), (3, (250, 0))]
)
def test_denoised_timestep_from_to_appendix_a(exit_index, expected):
    pipe = make_pipeline(make_generator())
    noise, cond = make_inputs(1, 2)
    out = pipe.inference_with_trajectory(noise, cond, [exit_index], generator=rng())
    assert (out.denoised_timestep_from, out.denoised_timestep_to) == expected


def test_denoised_timesteps_are_none_without_same_step():
    pipe = make_pipeline(make_generator(), same_step_across_blocks=False)
    noise, cond = make_inputs(1, 4)
    out = pipe.inference_with_trajectory(noise, cond, [0, 2], generator=rng())
    assert out.denoised_timestep_from is None and out.denoised_timestep_to is None


def test_sample_exit_steps_respects_flags():
    gen = make_generator()
    k = len(STEPS)
    assert make_pipeline(gen, last_step_only=True).sample_exit_steps(5) == [k - 1] * 5
    same = make_pipeline(gen)
    draws = [same.sample_exit_steps(4, rng(s)) for s in range(30)]
    assert all(len(set(d)) == 1 and 0 <= d[0] < k for d in draws)
    assert {d[0] for d in draws} == set(range(k))
    indep = make_pipeline(gen, same_step_across_blocks=False)
    draws = [indep.sample_exit_steps(4, rng(s)) for s in range(30)]
    assert any(len(set(d)) > 1 for d in draws) and all(0 <= s < k for d in draws for s in d)
    assert indep.sample_exit_steps(4, rng(3)) == indep.sample_exit_steps(4, rng(3))


def test_trailing_zero_is_dropped():
    gen = make_generator()
    with_zero = make_pipeline(gen, steps=torch.cat([STEPS, torch.zeros(1)]))
    assert torch.equal(with_zero.denoising_step_list, STEPS)
    noise, cond = make_inputs(1, 4)
    a = with_zero.inference_with_trajectory(noise, cond, [3, 3], generator=rng()).latents
    b = make_pipeline(gen).inference_with_trajectory(noise, cond, [3, 3], generator=rng()).latents
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "f_in, frames, n, iff, context, generated",
    [
        (0, 6, 2, False, [], [2, 2, 2]),
        (0, 5, 2, True, [], [1, 2, 2]),
        (1, 4, 2, False, [1], [2, 2]),
        (1, 4, 2, True, [1], [2, 2]),
        (2, 4, 2, False, [2], [2, 2]),
        (3, 6, 3, False, [3], [3, 3]),
        (3, 4, 2, False, [1, 2], [2, 2]),
    ],
)
def test_block_layouts(f_in, frames, n, iff, context, generated):
    plan = plan_blocks(f_in, frames, n, iff)
    assert (plan.context, plan.generated) == (context, generated)


@pytest.mark.parametrize(
    "f_in, frames, n, iff, match",
    [
        (0, 5, 2, False, "num_frame_per_block=2"),
        (2, 4, 2, True, "initial_latent has 2 frames"),
        (1, 3, 2, False, "multiple"),
    ],
)
def test_bad_layouts_are_clear_errors(f_in, frames, n, iff, match):
    with pytest.raises(ValueError, match=match):
        plan_blocks(f_in, frames, n, iff)


def test_bad_inputs_are_clear_errors():
    gen = make_generator()
    with pytest.raises(ValueError, match="strictly decreasing"):
        make_pipeline(gen, steps=[1000, 1000, 500])
    with pytest.raises(ValueError, match=r"\(0, 1000\]"):
        make_pipeline(gen, steps=[1200, 500])
    pipe = make_pipeline(gen, max_frames=4)
    noise, cond = make_inputs(1, 6)
    with pytest.raises(ValueError, match="num_max_frames=4"):
        pipe.inference_with_trajectory(noise, cond, [0, 0, 0])
    pipe = make_pipeline(gen)
    with pytest.raises(ValueError, match="exit_steps has 2 entries"):
        pipe.inference_with_trajectory(noise, cond, [0, 0])
    with pytest.raises(ValueError, match="exit_steps differ"):
        pipe.inference_with_trajectory(noise, cond, [0, 1, 0])
    with pytest.raises(KeyError, match="prompt_embeds"):
        pipe.inference_with_trajectory(noise, {}, [0, 0, 0])
    with pytest.raises(TypeError, match="CausalWanModel"):
        SelfForcingTrainingPipeline(nn.Linear(2, 2), FlowMatchScheduler(), STEPS, N, num_max_frames=4)
