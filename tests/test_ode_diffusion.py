"""ODE regression (spec §5.6) and causal diffusion / teacher forcing (spec §5.8): loss plumbing with
stub generators whose outputs are known, formulas written out here, and real tiny-model runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from model import CausalDiffusion, ODERegression
from tests.wan_helpers import randomize_
from utils.scheduler import FlowMatchScheduler
from wan import CausalWanModel, WanConfig, WanDiffusionWrapper

TINY = WanConfig.preset("tiny")
B, F, C, H, W = 3, 6, TINY.in_dim, 4, 4
N = 3
STEPS = [1000.0, 960.0, 888.9, 727.3, 0.0]  # shift-8 warp of [1000, 750, 500, 250] plus the clean end


class Stub(nn.Module):
    """A generator returning a known x0 / flow; records what it was given."""

    def __init__(self, x0=None, flow=None) -> None:
        super().__init__()
        self.x0, self.flow = x0, flow
        self.offset = nn.Parameter(torch.zeros(()))  # so the loss has a graph
        self.calls: list[tuple] = []

    def forward(self, noisy, t, ctx, **kwargs):
        self.calls.append((noisy, t, kwargs))
        x0 = (self.x0 if self.x0 is not None else torch.zeros_like(noisy)) + self.offset
        flow = (self.flow if self.flow is not None else torch.zeros_like(noisy)) + self.offset
        return flow, x0


def _tiny_generator() -> WanDiffusionWrapper:
    return WanDiffusionWrapper(
        randomize_(CausalWanModel(TINY, num_frame_per_block=N), seed=1), FlowMatchScheduler(shift=5.0)
    )


def _prompt() -> torch.Tensor:
    return torch.randn(B, 5, TINY.text_dim)


# ----------------------------------------------------------------------------------------------
# ODE regression
# ----------------------------------------------------------------------------------------------
def _ode() -> torch.Tensor:
    return torch.randn(B, len(STEPS), F, C, H, W)


def test_ode_perfect_predictor_gives_exactly_zero():
    ode = _ode()
    clean = ode[:, -1]
    # x0 equals the clean latent on every frame, except garbage wherever the input was already clean
    # (those frames must not count)
    stub = Stub()
    obj = ODERegression(stub, denoising_step_list=STEPS, num_frame_per_block=N)

    def perfect(noisy, t, ctx, **kwargs):
        stub.calls.append((noisy, t, kwargs))
        garbage = (t == 0)[:, :, None, None, None] * 100.0
        return torch.zeros_like(noisy), clean + garbage + stub.offset

    stub.forward = perfect
    for _ in range(5):
        loss, _ = obj.generator_loss({"prompt_embeds": _prompt(), "ode_latent": ode}, {})
        assert loss.item() == 0.0
    assert any((t == 0).any() for _, t, _ in stub.calls)  # the garbage frames did occur


def test_ode_inputs_follow_the_trajectory_per_chunk():
    ode = _ode()
    stub = Stub(x0=torch.zeros(B, F, C, H, W))
    obj = ODERegression(stub, denoising_step_list=STEPS, num_frame_per_block=N)
    steps = torch.tensor(STEPS)
    used = set()
    for _ in range(8):
        obj.generator_loss({"prompt_embeds": _prompt(), "ode_latent": ode}, {})
        noisy, t, kwargs = stub.calls[-1]
        assert kwargs == {}  # training path, no cache, no teacher forcing
        assert torch.equal(t[:, :N], t[:, :1].expand(B, N)) and torch.equal(
            t[:, N:], t[:, N : N + 1].expand(B, N)
        )
        for b in range(B):
            for f in range(F):
                k = int((steps == t[b, f]).nonzero())
                used.add(k)
                assert torch.equal(noisy[b, f], ode[b, k, f])
    assert used == set(range(len(STEPS)))


def test_ode_loss_formula_and_i2v_first_frame():
    ode = _ode()
    clean = ode[:, -1]
    delta = torch.arange(1, F + 1, dtype=torch.float32).view(1, F, 1, 1, 1) * 0.1
    stub = Stub(x0=clean + delta)
    obj = ODERegression(stub, denoising_step_list=STEPS, num_frame_per_block=N, i2v=True)
    for _ in range(4):
        loss, metrics = obj.generator_loss({"prompt_embeds": _prompt(), "ode_latent": ode}, {})
        noisy, t, _ = stub.calls[-1]
        assert (t[:, 0] == 0).all() and torch.equal(noisy[:, 0], clean[:, 0])
        counted = (t != 0).float()  # [B, F]
        expected = (counted * delta.view(1, F) ** 2).sum() / counted.sum()
        torch.testing.assert_close(loss, expected)
        assert metrics["generator_loss"] == pytest.approx(expected.item(), rel=1e-6)


def test_ode_real_model_runs_with_gradients():
    gen = _tiny_generator()
    obj = ODERegression(gen, denoising_step_list=STEPS, num_frame_per_block=N)
    loss, metrics = obj.generator_loss({"prompt_embeds": _prompt(), "ode_latent": _ode()}, {})
    assert torch.isfinite(loss) and loss > 0
    assert any(k.startswith("loss_t_q") for k in metrics)
    loss.backward()
    assert all(p.grad is not None for p in gen.parameters())


def test_ode_shape_errors_are_named():
    obj = ODERegression(Stub(), denoising_step_list=STEPS)
    with pytest.raises(ValueError, match="ode_latent"):
        obj.generator_loss({"prompt_embeds": _prompt(), "ode_latent": torch.randn(B, 3, F, C, H, W)}, {})
    with pytest.raises(KeyError, match="ode_latent"):
        obj.generator_loss({"prompt_embeds": _prompt()}, {})
    with pytest.raises(ValueError, match="end with 0"):
        ODERegression(Stub(), denoising_step_list=[1000, 500])


# ----------------------------------------------------------------------------------------------
# causal diffusion
# ----------------------------------------------------------------------------------------------
def _reference_weights(shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Training grid and weights (spec §3): y = exp(-2((t-500)/1000)^2), w = (y - min y) * 1000 / sum."""
    lin = torch.linspace(1, 0, 1001, dtype=torch.float64)[:-1]
    grid = 1000 * shift * lin / (1 + (shift - 1) * lin)
    y = torch.exp(-2 * ((grid - 500) / 1000) ** 2)
    w = (y - y.min()) * 1000 / (y - y.min()).sum()
    return grid, w


def _recover_noise(noisy, clean, t):
    sigma = (t.double() / 1000)[:, :, None, None, None]
    return (noisy.double() - (1 - sigma) * clean.double()) / sigma


def test_diffusion_loss_formula_with_known_output():
    sched = FlowMatchScheduler(shift=5.0)
    clean = torch.randn(B, F, C, H, W)
    flow = torch.randn(B, F, C, H, W)
    stub = Stub(flow=flow)
    obj = CausalDiffusion(stub, sched, num_frame_per_block=N)
    grid, weights = _reference_weights(5.0)
    for _ in range(4):
        loss, metrics = obj.generator_loss({"prompt_embeds": _prompt(), "clean_latent": clean}, {})
        noisy, t, kwargs = stub.calls[-1]
        assert kwargs == {}
        assert t.dtype == torch.float32
        assert torch.equal(t[:, :N], t[:, :1].expand(B, N)) and torch.equal(
            t[:, N:], t[:, N : N + 1].expand(B, N)
        )
        # every t is a grid point kept in float32 (no bf16 rounding: 833.33 stays 833.33)
        index = (grid.float()[None, :] == t.flatten()[:, None]).float().argmax(dim=1)
        assert torch.equal(grid.float()[index], t.flatten())
        noise = _recover_noise(noisy, clean, t)
        per_frame = ((flow.double() - (noise - clean.double())) ** 2).mean(dim=(2, 3, 4))
        expected = (weights[index].view(B, F) * per_frame).mean()
        torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=0)
        assert metrics["unweighted_loss"] == pytest.approx(per_frame.mean().item(), rel=1e-4)


@pytest.mark.parametrize("max_aug", [0, 100])
def test_teacher_forcing_passes_the_clean_context(max_aug):
    sched = FlowMatchScheduler(shift=5.0)
    clean = torch.randn(B, F, C, H, W)
    stub = Stub()
    obj = CausalDiffusion(
        stub, sched, num_frame_per_block=N, teacher_forcing=True, noise_augmentation_max_timestep=max_aug
    )
    for _ in range(4):
        obj.generator_loss({"prompt_embeds": _prompt(), "clean_latent": clean}, {})
        noisy, t, kwargs = stub.calls[-1]
        aug_t, context = kwargs["aug_t"], kwargs["clean_x"]
        assert aug_t.shape == (B, F)
        if max_aug == 0:
            assert (aug_t == 0).all() and torch.equal(context, clean)
            continue
        assert aug_t.min() >= 0 and aug_t.max() < max_aug and torch.equal(aug_t, aug_t.round())
        assert torch.equal(aug_t[:, :N], aug_t[:, :1].expand(B, N))
        # the context is noised with the same noise as the target, at its own level
        noise = _recover_noise(noisy, clean, t)
        sigma = (aug_t.double() / 1000)[:, :, None, None, None]
        expected = (1 - sigma) * clean.double() + sigma * noise
        torch.testing.assert_close(context.double(), expected, rtol=1e-4, atol=1e-4)


def test_teacher_forcing_real_model_uses_the_clean_context():
    gen = _tiny_generator()
    clean = torch.randn(B, F, C, H, W)
    prompt = _prompt()
    losses = []
    for tf in (True, False):
        obj = CausalDiffusion(gen, gen.scheduler, num_frame_per_block=N, teacher_forcing=tf)
        torch.manual_seed(3)
        loss, _ = obj.generator_loss({"prompt_embeds": prompt, "clean_latent": clean}, {})
        losses.append(loss)
    assert torch.isfinite(losses[0]) and losses[0] != losses[1]
    losses[0].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())


def test_diffusion_argument_errors():
    sched = FlowMatchScheduler()
    with pytest.raises(ValueError, match="teacher_forcing"):
        CausalDiffusion(Stub(), sched, noise_augmentation_max_timestep=10)
    obj = CausalDiffusion(Stub(), sched)
    with pytest.raises(KeyError, match="clean_latent"):
        obj.generator_loss({"prompt_embeds": _prompt()}, {})
