"""GAN discriminator head (spec §1.10) and GAN objective (spec §5.5): the head recomputed by hand from
its parameters, upstream's state-dict names, tap layers, softplus losses and finite-difference R1/R2
against their formulas, and gradient routing."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GAN, SelfForcingGenerator
from tests.wan_helpers import randomize_
from utils.scheduler import FlowMatchScheduler
from wan import CausalWanModel, WanConfig, WanDiffusionWrapper, WanModel
from wan.gan_head import add_gan_head, default_tap_layers, gan_logits
from wan.modules import sinusoidal_embedding

TINY3 = WanConfig.preset("tiny").replace(num_layers=3)
B, Fr, C, H, W = 2, 6, TINY3.in_dim, 4, 4
N = 3
SHAPE = [B, Fr, C, H, W]


def _critic(concat_time: bool = False, num_class: int = 1, seed: int = 3) -> WanDiffusionWrapper:
    sched = FlowMatchScheduler(shift=5.0)
    critic = add_gan_head(WanDiffusionWrapper(WanModel(TINY3), sched), num_class, concat_time)
    return randomize_(critic, seed=seed)


def _generator() -> WanDiffusionWrapper:
    sched = FlowMatchScheduler(shift=5.0)
    return WanDiffusionWrapper(randomize_(CausalWanModel(TINY3, num_frame_per_block=N), seed=1), sched)


def _batch() -> dict[str, torch.Tensor]:
    return {"prompt_embeds": torch.randn(B, 5, TINY3.text_dim), "clean_latent": torch.randn(B, Fr, C, H, W)}


# ----------------------------------------------------------------------------------------------
# the head
# ----------------------------------------------------------------------------------------------
def test_default_tap_layers():
    assert default_tap_layers(30) == (13, 21, 29)  # upstream's blocks for the 1.3B critic
    assert default_tap_layers(40) == (18, 28, 39)  # 40*14/30 = 18.7, 40*22/30 = 29.3, last block
    assert default_tap_layers(3) == (0, 1, 2)
    for layers in range(1, 61):
        taps = default_tap_layers(layers)
        assert list(taps) == sorted(taps) and taps[-1] == layers - 1 and taps[0] >= 0


@pytest.mark.parametrize("concat_time", [False, True])
def test_head_state_dict_names_match_upstream(concat_time):
    cfg = WanConfig.preset("wan2.1-t2v-1.3b")
    with torch.device("meta"):
        critic = add_gan_head(WanDiffusionWrapper(WanModel(cfg), FlowMatchScheduler()), 1, concat_time)
    sd = {k: tuple(v.shape) for k, v in critic.state_dict().items()}
    dim = 1536
    block = {
        "norm3.weight": (dim,),
        "norm3.bias": (dim,),
        "cross_attn.norm_q.weight": (dim,),
        "cross_attn.norm_k.weight": (dim,),
        "ffn.0.weight": (8192, dim),
        "ffn.0.bias": (8192,),
        "ffn.2.weight": (dim, 8192),
        "ffn.2.bias": (dim,),
    }
    for proj in "qkvo":
        block[f"cross_attn.{proj}.weight"] = (dim, dim)
        block[f"cross_attn.{proj}.bias"] = (dim,)
    cls_in = 3 * dim + (dim if concat_time else 0)
    expected = {
        "_register_tokens.register_tokens": (3, dim),
        "_register_tokens.rms_norm.weight": (dim,),
        "_cls_pred_branch.0.weight": (cls_in,),
        "_cls_pred_branch.0.bias": (cls_in,),
        "_cls_pred_branch.1.weight": (dim, cls_in),
        "_cls_pred_branch.1.bias": (dim,),
        "_cls_pred_branch.3.weight": (1, dim),
        "_cls_pred_branch.3.bias": (1,),
    }
    for i in range(3):
        expected.update({f"_gan_ca_blocks.{i}.{k}": v for k, v in block.items()})
    head = {k: v for k, v in sd.items() if not k.startswith("model.")}
    assert head == expected
    assert "model.blocks.29.ffn.0.weight" in sd  # the DiT keeps its `model.` prefix
    assert critic.gan_tap_layers == (13, 21, 29)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _manual_logits(critic: WanDiffusionWrapper, noisy: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor):
    """spec §1.10 written out: register token k cross-attends to the hidden states after tap block k."""
    cfg = critic.model.config
    taps = critic.gan_tap_layers
    _, hidden = critic.model(noisy.transpose(1, 2), t, ctx, hidden_states_at=tuple(sorted(set(taps))))
    by_block = dict(zip(sorted(set(taps)), hidden))
    regs = critic._register_tokens
    registers = _rms(regs.register_tokens, regs.rms_norm.weight, cfg.eps)
    heads, hd = cfg.num_heads, cfg.head_dim
    feats = []
    for k, tap in enumerate(taps):
        blk = critic._gan_ca_blocks[k]
        ca = blk.cross_attn
        video = F.layer_norm(by_block[tap], (cfg.dim,), blk.norm3.weight, blk.norm3.bias, cfg.eps)
        reg = registers[k].expand(noisy.shape[0], 1, cfg.dim)
        q = _rms(F.linear(reg, ca.q.weight, ca.q.bias), ca.norm_q.weight, cfg.eps).view(-1, 1, heads, hd)
        key = _rms(F.linear(video, ca.k.weight, ca.k.bias), ca.norm_k.weight, cfg.eps).view(
            -1, video.shape[1], heads, hd
        )
        val = F.linear(video, ca.v.weight, ca.v.bias).view(-1, video.shape[1], heads, hd)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, key) / math.sqrt(hd)
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), val).reshape(-1, 1, cfg.dim)
        token = reg + F.linear(attn, ca.o.weight, ca.o.bias)
        h = F.layer_norm(token, (cfg.dim,), eps=cfg.eps)
        h = F.linear(
            F.gelu(F.linear(h, blk.ffn[0].weight, blk.ffn[0].bias), approximate="tanh"),
            blk.ffn[2].weight,
            blk.ffn[2].bias,
        )
        feats.append(token + h)
    if critic.gan_concat_time_embeddings:
        e = critic.model.time_embedding(sinusoidal_embedding(t, cfg.freq_dim).float())
        feats.append(10.0 * e[:, None])
    z = torch.cat(feats, dim=1).flatten(1)
    cls = critic._cls_pred_branch
    z = F.layer_norm(z, (z.shape[-1],), cls[0].weight, cls[0].bias, 1e-5)
    return F.linear(F.silu(F.linear(z, cls[1].weight, cls[1].bias)), cls[3].weight, cls[3].bias)


@pytest.mark.parametrize("concat_time, num_class", [(False, 1), (True, 3)])
def test_logits_match_hand_computation(concat_time, num_class):
    critic = _critic(concat_time, num_class)
    noisy = torch.randn(B, Fr, C, H, W)
    t = torch.tensor([300.0, 800.0])
    ctx = torch.randn(B, 5, TINY3.text_dim)
    with torch.no_grad():
        ours = gan_logits(critic, noisy, t, ctx)
        ref = _manual_logits(critic, noisy, t, ctx)
    assert ours.shape == (B, num_class)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_head_needs_a_bidirectional_critic():
    causal = WanDiffusionWrapper(CausalWanModel(TINY3), FlowMatchScheduler())
    with pytest.raises(TypeError, match="WanModel"):
        add_gan_head(causal)
    with pytest.raises(ValueError, match="tap_layers"):
        add_gan_head(WanDiffusionWrapper(WanModel(TINY3), FlowMatchScheduler()), tap_layers=[0, 3])


# ----------------------------------------------------------------------------------------------
# the objective
# ----------------------------------------------------------------------------------------------
def _gan(critic=None, **kwargs) -> GAN:
    gen = _generator()
    critic = critic if critic is not None else _critic()
    steps = gen.scheduler.warp([1000, 750, 500, 250]).tolist()
    rollout = SelfForcingGenerator.build(
        gen, gen.scheduler, image_or_video_shape=SHAPE, denoising_step_list=steps, num_frame_per_block=N
    )
    return GAN(gen, critic, gen.scheduler, rollout=rollout, **kwargs)


def _softplus(x: torch.Tensor) -> torch.Tensor:
    return torch.log1p(torch.exp(x))


@pytest.mark.parametrize("relativistic", [False, True])
def test_softplus_losses(relativistic):
    obj = _gan(relativistic_discriminator=relativistic, gan_g_weight=0.3, gan_d_weight=0.7)
    lf, lr = torch.randn(B, 1), torch.randn(B, 1)
    if relativistic:
        g_expected = 0.3 * _softplus(-(lf - lr)).mean()
        d_expected = 0.7 * _softplus(-(lr - lf)).mean()
    else:
        g_expected = 0.3 * _softplus(-lf).mean()
        d_expected = 0.7 * (_softplus(-lr).mean() + _softplus(lf).mean())
    torch.testing.assert_close(obj.generator_gan_loss(lf, lr), g_expected)
    torch.testing.assert_close(obj.discriminator_gan_loss(lf, lr), d_expected)


def test_finite_difference_penalty_formula():
    obj = _gan()
    noisy = torch.randn(B, Fr, C, H, W)
    t = torch.full((B, Fr), 400.0)
    ctx = torch.randn(B, 5, TINY3.text_dim)
    with torch.no_grad():
        logit = _manual_logits(obj.critic, noisy, t[:, 0], ctx)
        torch.manual_seed(11)
        penalty = obj.finite_difference_penalty(noisy, logit, t, ctx, sigma=0.05, weight=2.0)
        torch.manual_seed(11)
        perturbed = noisy + 0.05 * torch.randn_like(noisy)
        expected = 2.0 * (((_manual_logits(obj.critic, perturbed, t[:, 0], ctx) - logit) / 0.05) ** 2).mean()
    torch.testing.assert_close(penalty, expected, rtol=1e-4, atol=1e-8)
    assert penalty > 0


def test_r1_r2_vanish_for_a_constant_discriminator():
    critic = _critic()
    rng = torch.Generator().manual_seed(0)
    obj = _gan(critic, r1_weight=1.0, r2_weight=1.0)
    _, metrics = obj.critic_loss(_batch(), obj.sample_shared(B, rng))
    assert metrics["r1_loss"] > 0 and metrics["r2_loss"] > 0
    with torch.no_grad():
        critic._cls_pred_branch[3].weight.zero_()  # logits = bias whatever the input
    loss, metrics = obj.critic_loss(_batch(), obj.sample_shared(B, rng))
    assert metrics["r1_loss"] == 0.0 and metrics["r2_loss"] == 0.0
    bias = critic._cls_pred_branch[3].bias.detach()
    expected = 0.01 * (_softplus(-bias).mean() + _softplus(bias).mean())  # default gan_d_weight
    torch.testing.assert_close(loss.detach(), expected)


def _has_grad(module: nn.Module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def _no_grad(module: nn.Module) -> bool:
    return all(p.grad is None for p in module.parameters())


def test_gradient_routing_and_no_teacher():
    obj = _gan(r1_weight=0.5, r2_weight=0.5)
    assert "real_score" not in inspect.signature(GAN).parameters
    assert sum(isinstance(m, WanModel) for m in obj.modules()) == 1  # only the critic's DiT
    assert obj.trainable_modules() == {"generator": obj.generator, "critic": obj.critic}
    rng = torch.Generator().manual_seed(0)
    loss, metrics = obj.generator_loss(_batch(), obj.sample_shared(B, rng))
    loss.backward()
    assert torch.isfinite(loss) and metrics["generator_loss"] > 0
    assert _has_grad(obj.generator) and _no_grad(obj.critic)
    obj.generator.zero_grad(set_to_none=True)
    loss, _ = obj.critic_loss(_batch(), obj.sample_shared(B, rng))
    loss.backward()
    assert _no_grad(obj.generator)
    for name in ("_register_tokens", "_gan_ca_blocks", "_cls_pred_branch"):
        assert _has_grad(getattr(obj.critic, name)), name


def test_real_data_is_required_and_checked():
    obj = _gan()
    rng = torch.Generator().manual_seed(0)
    with pytest.raises(KeyError, match="clean_latent"):
        obj.critic_loss({"prompt_embeds": torch.randn(B, 5, TINY3.text_dim)}, obj.sample_shared(B, rng))
    bad = {
        "prompt_embeds": torch.randn(B, 5, TINY3.text_dim),
        "clean_latent": torch.randn(B, Fr - 1, C, H, W),
    }
    with pytest.raises(ValueError, match="clean_latent"):
        obj.critic_loss(bad, obj.sample_shared(B, rng))


def test_critic_without_head_is_rejected():
    gen = _generator()
    plain = WanDiffusionWrapper(WanModel(TINY3), gen.scheduler)
    with pytest.raises(ValueError, match="add_gan_head"):
        GAN(
            gen,
            plain,
            gen.scheduler,
            rollout=SelfForcingGenerator.build(gen, gen.scheduler, image_or_video_shape=SHAPE),
        )
