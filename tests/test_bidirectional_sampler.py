"""BidirectionalSampler against references written out here.

* Euler + CFG on a tiny random Wan DiT: an Euler loop over the shifted sigma grid, written from the
  formulas (sigma_i = S(1 - i/N), x <- x + (sigma_{i+1} - sigma_i) v, v = v_u + g (v_c - v_u)), calling
  the bare `WanModel`.
* The 48-step shift-8 grid's kept timesteps against the spec's Appendix A numbers.
* UniPC (diffusers) and Euler on a toy model whose probability-flow ODE has a closed-form solution:
  data ~ N(mu, s^2) per element, so x(sigma) = (1 - sigma) mu + sqrt((1 - sigma)^2 s^2 + sigma^2) eps.
"""

import pytest
import torch
from torch import nn

from pipeline.bidirectional_inference import BidirectionalSampler
from tests.wan_helpers import randomize_
from utils.scheduler import FlowMatchScheduler
from wan import CausalWanModel, WanConfig, WanDiffusionWrapper, WanModel

CFG = WanConfig.preset("tiny")
SHAPE = (2, 3, CFG.in_dim, 4, 6)  # [B, F, C, H, W]


@pytest.fixture(scope="module")
def dit():
    return randomize_(WanModel(CFG), seed=1).eval()


def _shifted_sigma(u: float, shift: float) -> float:
    return shift * u / (1 + (shift - 1) * u)


def _reference_euler(dit, noise, cond, uncond, steps, shift, g):
    """All N+1 states of the guided Euler loop, calling the DiT in its own [B, C, F, H, W] layout."""
    sigmas = [_shifted_sigma(1 - i / steps, shift) for i in range(steps)] + [0.0]
    x, states = noise.clone(), [noise.clone()]
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((noise.shape[0],), 1000 * sigmas[i])
            v_c = dit(x.transpose(1, 2), t, cond).transpose(1, 2)
            v_u = dit(x.transpose(1, 2), t, uncond.expand(noise.shape[0], -1, -1)).transpose(1, 2)
            v = v_u + g * (v_c - v_u)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
            states.append(x.clone())
    return states


def test_euler_matches_written_out_loop_and_records_its_states(dit):
    steps, shift, g = 6, 8.0, 4.0
    noise = torch.randn(SHAPE)
    cond = torch.randn(SHAPE[0], 5, CFG.text_dim)
    uncond = torch.randn(1, 7, CFG.text_dim)  # one negative prompt, a different length
    sampler = BidirectionalSampler(WanDiffusionWrapper(dit, FlowMatchScheduler()), shift, steps, g, "euler")
    record = [0, 2, 5, -1]
    out = sampler.sample(noise, cond, uncond, record_indices=record)

    ref = _reference_euler(dit, noise, cond, uncond, steps, shift, g)
    torch.testing.assert_close(out.latents, ref[-1], rtol=1e-5, atol=1e-5)
    assert out.trajectory.shape == (SHAPE[0], len(record), *SHAPE[1:])
    for k, i in enumerate(record):
        torch.testing.assert_close(out.trajectory[:, k], ref[i], rtol=1e-5, atol=1e-5)
    # the last step is run: the final state is not the state before it
    assert (out.latents - ref[-2]).abs().max() > 1e-2
    assert torch.equal(out.trajectory[:, 0], noise)
    expected_t = [1000 * _shifted_sigma(1 - i / steps, shift) for i in range(steps)] + [0.0]
    torch.testing.assert_close(out.timesteps, torch.tensor(expected_t), rtol=1e-6, atol=1e-4)


class GaussianFlow(nn.Module):
    """Exact flow velocity from N(0, I) to data N(mu, s^2 I); mu = mean of the context embedding.

    x_sigma = a x0 + sigma eps with a = 1 - sigma; with var = a^2 s^2 + sigma^2 the posterior means are
    E[x0 | x] = mu + a s^2 (x - a mu) / var and E[eps | x] = sigma (x - a mu) / var, and v = E[eps] - E[x0].
    """

    def __init__(self, s: float) -> None:
        super().__init__()
        self.s = s
        self.calls = 0

    def forward(self, x, t, context):
        self.calls += 1
        sigma = (t.double() / 1000).view(-1, 1, 1, 1, 1)
        mu = context.double().mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        a = 1 - sigma
        var = a**2 * self.s**2 + sigma**2
        centred = x.double() - a * mu
        v = sigma * centred / var - (mu + a * self.s**2 * centred / var)
        return v.float(), (x.double() - sigma * v).float()


def _toy_inputs():
    noise = torch.randn(SHAPE)
    cond = torch.full((SHAPE[0], 3, 4), 0.5) + torch.arange(SHAPE[0]).view(-1, 1, 1)  # mu = 0.5, 1.5
    uncond = torch.full((1, 3, 4), -1.0)
    return noise, cond, uncond


def test_guidance_one_skips_the_unconditional_pass_and_both_solvers_solve_the_ode():
    s, shift = 0.7, 8.0
    noise, cond, _ = _toy_inputs()
    exact = cond.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1) + s * noise  # x(0) = mu + s eps

    def error(solver: str, steps: int) -> float:
        toy = GaussianFlow(s)
        out = BidirectionalSampler(toy, shift, steps, 1.0, solver).sample(noise, cond, None)
        assert toy.calls == steps  # no unconditional pass at g = 1
        return (out.latents - exact).abs().max().item()

    assert error("euler", 2000) < 1e-2
    assert error("unipc", 100) < 2e-2
    # UniPC is a higher-order method: 3.3x the steps cuts its error by more than 8x (Euler: ~3.3x)
    assert error("unipc", 30) > 8 * error("unipc", 100)


def test_unipc_is_deterministic_and_agrees_with_fine_euler_under_cfg():
    noise, cond, uncond = _toy_inputs()
    toy = GaussianFlow(0.7)
    unipc = BidirectionalSampler(toy, 8.0, 200, 3.0, "unipc")
    first = unipc.sample(noise, cond, uncond, record_indices=[0, 100, -1])
    second = unipc.sample(noise, cond, uncond, record_indices=[0, 100, -1])
    assert torch.equal(first.latents, second.latents)
    assert torch.equal(first.trajectory, second.trajectory)
    assert torch.equal(first.trajectory[:, 0], noise)
    assert torch.equal(first.trajectory[:, -1], first.latents)
    assert first.timesteps[0] == pytest.approx(1000, abs=1e-2) and first.timesteps[-1] == 0

    fine = BidirectionalSampler(toy, 8.0, 4000, 3.0, "euler").sample(noise, cond, uncond)
    torch.testing.assert_close(first.latents, fine.latents, rtol=0, atol=2e-2)


def test_48_step_shift_8_grid_keeps_upstreams_timesteps():
    noise, cond, uncond = _toy_inputs()
    sampler = BidirectionalSampler(GaussianFlow(0.7), 8.0, 48, 6.0, "euler")
    out = sampler.sample(noise, cond, uncond, record_indices=[0, 12, 24, 36, -1])
    # spec Appendix A: timesteps[12, 24, 36] = 960, 888.89, 727.27; the final state is t = 0
    torch.testing.assert_close(
        out.recorded_timesteps, torch.tensor([1000.0, 960.0, 8000 / 9, 8000 / 11, 0.0]), rtol=0, atol=1e-3
    )
    assert out.trajectory.shape == (SHAPE[0], 5, *SHAPE[1:])
    assert torch.equal(out.trajectory[:, -1], out.latents)


def test_bad_arguments_are_named(dit):
    wrapper = WanDiffusionWrapper(dit, FlowMatchScheduler())
    noise, cond, uncond = (
        torch.randn(SHAPE),
        torch.randn(SHAPE[0], 5, CFG.text_dim),
        torch.randn(1, 5, CFG.text_dim),
    )
    with pytest.raises(ValueError, match="solver"):
        BidirectionalSampler(wrapper, 8.0, 4, 6.0, "heun")
    with pytest.raises(ValueError, match="causal"):
        BidirectionalSampler(WanDiffusionWrapper(CausalWanModel(CFG), FlowMatchScheduler()), 8.0, 4, 6.0)
    sampler = BidirectionalSampler(wrapper, 8.0, 4, 6.0)
    with pytest.raises(ValueError, match="uncond_embeds"):
        sampler.sample(noise, cond, None)
    with pytest.raises(ValueError, match="record index 5 out of range"):
        sampler.sample(noise, cond, uncond, record_indices=[0, 5])
    with pytest.raises(ValueError, match="increasing"):
        sampler.sample(noise, cond, uncond, record_indices=[2, 1])
    with pytest.raises(ValueError, match="cond_embeds"):
        sampler.sample(noise, cond[:1], uncond)
