"""DMD, SiD and CausVid against their formulas written out here (spec §5.2-§5.4, §5.7), with the score
outputs recomputed from the raw DiTs, and the gradient routing between generator, critic and teacher."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from model import DMD, CausVid, SelfForcingGenerator, SiD, build_objective
from tests.wan_helpers import randomize_
from utils.scheduler import FlowMatchScheduler
from wan import CausalWanModel, WanConfig, WanDiffusionWrapper, WanModel

TINY = WanConfig.preset("tiny")
B, F, C, H, W = 2, 6, TINY.in_dim, 4, 4
N = 3
SHAPE = [B, F, C, H, W]


@pytest.fixture
def nets():
    sched = FlowMatchScheduler(shift=5.0)
    gen = WanDiffusionWrapper(randomize_(CausalWanModel(TINY, num_frame_per_block=N), seed=1), sched)
    real = WanDiffusionWrapper(randomize_(WanModel(TINY), seed=2), sched)
    fake = WanDiffusionWrapper(randomize_(WanModel(TINY), seed=3), sched)
    return gen, real, fake, sched


def _rollout(gen: WanDiffusionWrapper, sched: FlowMatchScheduler, **kwargs) -> SelfForcingGenerator:
    """The Self-Forcing rollout over the `SHAPE` window (rollout keywords as `SelfForcingGenerator.build`)."""
    return SelfForcingGenerator.build(gen, sched, image_or_video_shape=SHAPE, **kwargs)


def _batch() -> dict[str, torch.Tensor]:
    return {
        "prompt_embeds": torch.randn(B, 5, TINY.text_dim),
        "negative_prompt_embeds": torch.randn(B, 7, TINY.text_dim),
        "clean_latent": torch.randn(B, F, C, H, W),
    }


def _sigma(t: torch.Tensor) -> torch.Tensor:
    return (t / 1000.0)[:, :, None, None, None]


def _noisy(x, noise, t):
    return (1 - _sigma(t)) * x + _sigma(t) * noise


def _x0(net: WanDiffusionWrapper, xt: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """x0 from the raw DiT velocity: x0 = x_t - sigma * v (one timestep per sample)."""
    v = net.model(xt.transpose(1, 2), t[:, 0], ctx).transpose(1, 2)
    return xt - _sigma(t) * v


def _inputs(requires_grad: bool = True):
    x = torch.randn(B, F, C, H, W, requires_grad=requires_grad)
    t = torch.tensor([[300.0] * F, [700.0] * F])
    noise = torch.randn(B, F, C, H, W)
    return x, t, noise


def _frame_mask() -> torch.Tensor:
    mask = torch.ones(B, F, C, H, W, dtype=torch.bool)
    mask[:, :N] = False
    return mask


# ----------------------------------------------------------------------------------------------
# DMD
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "guidance, real_guidance, fake_guidance, masked",
    [(3.0, None, 0.0, False), (3.0, 1.5, 0.0, True), (2.0, None, 0.5, False)],
)
def test_dmd_loss_value_and_gradient(nets, guidance, real_guidance, fake_guidance, masked):
    gen, real, fake, sched = nets
    obj = DMD(
        gen,
        real,
        fake,
        sched,
        rollout=_rollout(gen, sched, num_frame_per_block=N),
        guidance_scale=guidance,
        real_guidance_scale=real_guidance,
        fake_guidance_scale=fake_guidance,
    )
    batch = _batch()
    x, t, noise = _inputs()
    mask = _frame_mask() if masked else None
    loss, metrics = obj.dmd_loss(x, t, noise, batch, mask)
    loss.backward()

    # upstream's CFG form: cond + s * (cond - uncond)
    s_real = guidance if real_guidance is None else real_guidance
    with torch.no_grad():
        xt = _noisy(x, noise, t)
        rc, ru = _x0(real, xt, t, batch["prompt_embeds"]), _x0(real, xt, t, batch["negative_prompt_embeds"])
        r = rc + s_real * (rc - ru)
        f = _x0(fake, xt, t, batch["prompt_embeds"])
        if fake_guidance:
            fu = _x0(fake, xt, t, batch["negative_prompt_embeds"])
            f = f + fake_guidance * (f - fu)
        g = (f - r) / (x - r).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    if mask is None:
        expected_loss, expected_grad = 0.5 * (g**2).mean(), g / g.numel()
    else:
        expected_loss, expected_grad = 0.5 * (g[mask] ** 2).mean(), g * mask / mask.sum()
    torch.testing.assert_close(loss.float(), expected_loss, rtol=1e-4, atol=0)
    torch.testing.assert_close(x.grad, expected_grad, rtol=1e-4, atol=1e-9)
    if mask is not None:
        assert (x.grad[~mask] == 0).all()
    assert metrics["dmdtrain_gradient_norm"] == pytest.approx(g.abs().mean().item(), rel=1e-4)
    # t = 300 is in the second quarter, t = 700 in the third
    assert metrics["loss_t_q1"] == pytest.approx(0.5 * (g[0] ** 2).mean().item(), rel=1e-4)
    assert metrics["loss_t_q2"] == pytest.approx(0.5 * (g[1] ** 2).mean().item(), rel=1e-4)
    assert fake.model.blocks[0].ffn[0].weight.grad is None


@pytest.mark.parametrize("loss_type", ["flow", "x0"])
def test_critic_denoising_loss(nets, loss_type):
    gen, real, fake, sched = nets
    obj = DMD(gen, real, fake, sched, rollout=_rollout(gen, sched), denoising_loss_type=loss_type)
    batch = _batch()
    x, t, noise = _inputs(requires_grad=False)
    loss = obj.denoising_loss(x, t, noise, batch)
    with torch.no_grad():
        xt = _noisy(x, noise, t)
        v = fake.model(xt.transpose(1, 2), t[:, 0], batch["prompt_embeds"]).transpose(1, 2)
        if loss_type == "flow":
            expected = ((v - (noise - x)) ** 2).mean()
        else:
            expected = ((xt - _sigma(t) * v - x) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    loss.backward()
    assert fake.model.head.head.weight.grad is not None


def test_missing_negative_prompt_is_named(nets):
    gen, real, fake, sched = nets
    obj = DMD(gen, real, fake, sched, rollout=_rollout(gen, sched))
    x, t, noise = _inputs()
    with pytest.raises(KeyError, match="negative_prompt_embeds"):
        obj.dmd_loss(x, t, noise, {"prompt_embeds": torch.randn(B, 5, TINY.text_dim)})


# ----------------------------------------------------------------------------------------------
# SiD
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("masked", [False, True])
def test_sid_loss_value_gradient_and_mask(nets, masked):
    gen, real, fake, sched = nets
    alpha, guidance = 0.7, 3.0
    obj = SiD(gen, real, fake, sched, rollout=_rollout(gen, sched), sid_alpha=alpha, guidance_scale=guidance)
    batch = _batch()
    x, t, noise = _inputs()
    mask = _frame_mask() if masked else None
    loss, metrics = obj.sid_loss(x, t, noise, batch, mask)
    loss.backward()

    # reference: the §5.4 formula, differentiated by autograd through both scores w.r.t. x only
    x_ref = x.detach().clone().requires_grad_(True)
    xt = _noisy(x_ref, noise, t)
    rc, ru = _x0(real, xt, t, batch["prompt_embeds"]), _x0(real, xt, t, batch["negative_prompt_embeds"])
    r = rc + guidance * (rc - ru)
    f = _x0(fake, xt, t, batch["prompt_embeds"])
    normaliser = (x_ref - r).abs().mean(dim=(1, 2, 3, 4), keepdim=True).detach()
    ell = (r - f) * ((r - x_ref) - alpha * (r - f)) / normaliser
    value = ell.mean() if mask is None else ell[mask].mean()
    (grad_ref,) = torch.autograd.grad(value, x_ref)

    torch.testing.assert_close(loss.float(), value.detach(), rtol=1e-4, atol=1e-7)
    assert metrics["generator_loss"] == pytest.approx(value.item(), rel=1e-4, abs=1e-7)
    if mask is None:
        torch.testing.assert_close(x.grad, grad_ref, rtol=1e-3, atol=1e-7)
    else:
        # the bidirectional scores carry gradient into the masked frames; SiD must drop it
        assert grad_ref[~mask].abs().sum() > 0
        assert (x.grad[~mask] == 0).all()
        torch.testing.assert_close(x.grad[mask], grad_ref[mask], rtol=1e-3, atol=1e-7)
    # the score networks' parameters receive nothing from the generator loss
    assert all(p.grad is None for p in fake.parameters())
    assert all(p.grad is None for p in real.parameters())


def test_sid_rejects_fake_cfg(nets):
    gen, real, fake, sched = nets
    with pytest.raises(ValueError, match="fake_guidance_scale"):
        SiD(gen, real, fake, sched, rollout=_rollout(gen, sched), fake_guidance_scale=1.0)


# ----------------------------------------------------------------------------------------------
# gradient routing through whole steps (rollout included)
# ----------------------------------------------------------------------------------------------
def _has_grad(module: nn.Module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def _no_grad(module: nn.Module) -> bool:
    return all(p.grad is None for p in module.parameters())


@pytest.mark.parametrize("name", ["dmd", "sid", "causvid"])
def test_generator_and_critic_steps_touch_only_their_module(nets, name):
    gen, real, fake, sched = nets
    steps = sched.warp([1000, 750, 500, 250]).tolist()
    if name == "causvid":
        kwargs = {"denoising_step_list": steps, "num_frame_per_block": N}
    else:
        kwargs = {"rollout": _rollout(gen, sched, denoising_step_list=steps, num_frame_per_block=N)}
    obj = build_objective(name, gen, real, fake, sched, **kwargs)
    assert not any(p.requires_grad for p in real.parameters()), "the teacher is frozen"
    batch = _batch()
    rng = torch.Generator().manual_seed(0)

    loss, metrics = obj.generator_loss(batch, obj.sample_shared(B, rng))
    assert torch.isfinite(loss) and "generator_loss" in metrics
    loss.backward()
    assert _has_grad(gen) and _no_grad(fake) and _no_grad(real)
    gen.zero_grad(set_to_none=True)

    loss, metrics = obj.critic_loss(batch, obj.sample_shared(B, rng))
    assert torch.isfinite(loss) and "critic_loss" in metrics
    loss.backward()
    assert _has_grad(fake) and _no_grad(gen) and _no_grad(real)


# ----------------------------------------------------------------------------------------------
# CausVid: the generator input is built from the clean latent
# ----------------------------------------------------------------------------------------------
class Recorder(nn.Module):
    """Calls the real generator and records its inputs."""

    def __init__(self, inner: WanDiffusionWrapper) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple] = []

    def forward(self, noisy, t, ctx, **kwargs):
        out = self.inner(noisy, t, ctx, **kwargs)
        self.calls.append((noisy, t, kwargs, out))
        return out


@pytest.mark.parametrize("teacher_forcing", [False, True])
def test_causvid_generator_input(nets, teacher_forcing):
    gen, real, fake, sched = nets
    rec = Recorder(gen)
    steps = [1000.0, 750.0, 500.0, 0.0]
    obj = CausVid(
        rec,
        real,
        fake,
        sched,
        denoising_step_list=steps,
        num_frame_per_block=N,
        teacher_forcing=teacher_forcing,
    )
    batch = _batch()
    clean = batch["clean_latent"]
    seen = set()
    for _ in range(6):
        out = obj.generate(batch, {})
        noisy, t, kwargs, (_, x0) = rec.calls[-1]
        assert torch.equal(out.latents, x0) and out.gradient_mask is None
        assert torch.equal(t[:, :N], t[:, :1].expand(B, N)) and torch.equal(
            t[:, N:], t[:, N : N + 1].expand(B, N)
        )
        assert torch.isin(t, torch.tensor(steps)).all()
        seen.update(t.flatten().tolist())
        clean_frames = t == 0
        assert torch.equal(noisy[clean_frames], clean[clean_frames])
        assert not torch.isclose(noisy[~clean_frames], clean[~clean_frames]).all()
        if teacher_forcing:
            assert torch.equal(kwargs["clean_x"], clean)
        else:
            assert "clean_x" not in kwargs
    assert len(seen) >= 3


def test_causvid_needs_clean_latent(nets):
    gen, real, fake, sched = nets
    obj = CausVid(gen, real, fake, sched, denoising_step_list=[1000, 500])
    with pytest.raises(KeyError, match="clean_latent"):
        obj.generate({"prompt_embeds": torch.randn(B, 5, TINY.text_dim)}, {})


# ----------------------------------------------------------------------------------------------
# non-finite scores and activation checkpointing of the teacher
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dmd", "sid"])
@pytest.mark.parametrize("broken", ["real_x0", "fake_x0"])
def test_a_non_finite_score_makes_the_generator_loss_non_finite(nets, name, broken, monkeypatch):
    # (upstream's nan_to_num turned a NaN teacher or critic into a zero gradient and a finite loss)
    gen, real, fake, sched = nets
    obj = build_objective(name, gen, real, fake, sched, rollout=_rollout(gen, sched))
    x, t, noise = _inputs()
    score = getattr(obj, broken)

    def poisoned(noisy, t, batch):
        out = score(noisy, t, batch).clone()
        out.view(-1)[5] = float("nan")  # one element is enough
        return out

    monkeypatch.setattr(obj, broken, poisoned)
    loss, _ = obj.distribution_loss(x, t, noise, _batch(), None)
    assert not torch.isfinite(loss)


def test_a_zero_normaliser_still_gives_a_zero_gradient(nets, monkeypatch):
    # When the generated sample equals the teacher's x0 exactly, g = 0/0: zero, as upstream.
    gen, real, fake, sched = nets
    obj = DMD(gen, real, fake, sched, rollout=_rollout(gen, sched))
    x, t, noise = _inputs()
    monkeypatch.setattr(obj, "real_x0", lambda noisy, t, batch: x.detach().clone())
    monkeypatch.setattr(obj, "fake_x0", lambda noisy, t, batch: x.detach().clone())
    g = obj.kl_gradient(x, t, noise, _batch())
    assert torch.equal(g, torch.zeros_like(g))


def test_sid_generator_gradients_are_the_same_with_teacher_checkpointing(nets):
    # SiD backpropagates through the teacher, so the trainer checkpoints the teacher's blocks too;
    # recomputing them in the backward pass must not change the generator's gradient.
    gen, real, fake, sched = nets
    obj = SiD(gen, real, fake, sched, rollout=_rollout(gen, sched))
    grads = []
    for checkpointing in (False, True):
        real.model.enable_gradient_checkpointing(checkpointing)
        gen.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        loss, _ = obj.generator_loss(_batch(), obj.sample_shared(B, torch.Generator().manual_seed(3)))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in gen.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-9, msg=n)
