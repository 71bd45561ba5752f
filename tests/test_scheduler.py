"""FlowMatchScheduler against the spec's Appendix A numbers and formulas written out here."""

import math

import pytest
import torch

from utils.scheduler import FlowMatchScheduler


def _shift(sigma: float, s: float) -> float:
    return s * sigma / (1 + (s - 1) * sigma)


# ---------------------------------------------------------------------------- grids and warping


@pytest.mark.parametrize(
    "shift, expected",
    [(5.0, [1000.0, 937.5, 2500.0 / 3.0, 625.0]), (8.0, [1000.0, 960.0, 8000.0 / 9.0, 8000.0 / 11.0])],
)
def test_warp_matches_appendix_a(shift, expected):
    warped = FlowMatchScheduler(shift=shift).warp([1000, 750, 500, 250])
    torch.testing.assert_close(warped, torch.tensor(expected), rtol=0, atol=1e-3)


def test_warp_formula_and_zero():
    sched = FlowMatchScheduler(shift=5.0)
    steps = [1000, 800, 333, 17, 0]
    expected = torch.tensor([1000 * _shift(s / 1000, 5.0) for s in steps])
    torch.testing.assert_close(sched.warp(steps), expected.float())
    assert sched.warp([0]).item() == 0.0


@pytest.mark.parametrize("shift, t_min", [(5.0, 4.9801), (8.0, 7.9444)])
def test_training_grid(shift, t_min):
    sched = FlowMatchScheduler(shift=shift)
    assert sched.timesteps.shape == (1000,) and sched.sigmas.shape == (1000,)
    assert sched.timesteps[0].item() == pytest.approx(1000.0)
    assert sched.timesteps[-1].item() == pytest.approx(t_min, abs=1e-4)
    # Element by element: k-th point is the shifted (1 - k/1000), strictly decreasing.
    for k in (0, 1, 250, 500, 999):
        assert sched.sigmas[k].item() == pytest.approx(_shift(1 - k / 1000, shift), rel=1e-12)
    assert (sched.timesteps[1:] < sched.timesteps[:-1]).all()
    torch.testing.assert_close(sched.timesteps, sched.sigmas * 1000)


def test_training_weight():
    sched = FlowMatchScheduler(shift=5.0)
    assert sched.training_weight(1000.0).item() == pytest.approx(0.0, abs=1e-6)
    assert sched.training_weight(500.0).item() == pytest.approx(2.076, abs=2e-3)
    assert sched.training_weight(sched.timesteps[-1]).item() == pytest.approx(0.032, abs=1e-3)
    assert sched.linear_timesteps_weights.mean().item() == pytest.approx(1.0, abs=1e-9)
    # The formula written out independently, at a grid point looked up through a nearby t.
    grid = [1000 * _shift(1 - k / 1000, 5.0) for k in range(1000)]
    y = [math.exp(-2 * ((g - 500) / 1000) ** 2) for g in grid]
    y_min = min(y)
    norm = 1000 / sum(v - y_min for v in y)
    k = 640
    assert sched.training_weight(grid[k] + 1e-3).item() == pytest.approx((y[k] - y_min) * norm, rel=1e-5)
    # Shape follows t.
    assert sched.training_weight(torch.full((2, 3), 500.0)).shape == (2, 3)


def test_inference_timesteps_48_step_shift_8():
    ts = FlowMatchScheduler(shift=8.0).inference_timesteps(48)
    assert ts.shape == (48,)
    assert ts[0].item() == pytest.approx(1000.0)
    assert ts[12].item() == pytest.approx(960.0, abs=1e-3)
    assert ts[24].item() == pytest.approx(888.89, abs=1e-2)
    assert ts[36].item() == pytest.approx(727.27, abs=1e-2)
    assert ts[-1].item() == pytest.approx(1000 * 8 / 55, abs=1e-3)  # sigma_lin = 1/48 -> 145.45


def test_inference_timesteps_denoising_strength():
    ts = FlowMatchScheduler(shift=3.0).inference_timesteps(4, denoising_strength=0.5)
    expected = [1000 * _shift(0.5 - i * 0.125, 3.0) for i in range(4)]
    torch.testing.assert_close(ts, torch.tensor(expected))


# ---------------------------------------------------------------------------- sigma and quantisation


def test_sigma_continuous_and_quantized():
    cont = FlowMatchScheduler(shift=5.0)
    assert cont.sigma(0.0).item() == 0.0
    assert cont.sigma(937.5).item() == pytest.approx(0.9375)

    quant = FlowMatchScheduler(shift=5.0, quantize=True)
    # t = 0 snaps to the last grid point, sigma = S(0.001) ~= 0.005 (never exactly clean upstream).
    assert quant.sigma(0.0).item() == pytest.approx(_shift(0.001, 5.0), rel=1e-6)
    assert quant.sigma(0.0).item() == pytest.approx(0.005, abs=1e-4)
    # A t between two grid points snaps to the nearer one.
    t_hi, t_lo = quant.timesteps[100].item(), quant.timesteps[101].item()
    near_hi = t_hi - 0.2 * (t_hi - t_lo)
    assert quant.sigma(near_hi).item() == pytest.approx(quant.sigmas[100].item(), rel=1e-6)
    assert quant.sigma(torch.tensor([[near_hi, t_lo + 1e-4]])).tolist()[0] == pytest.approx(
        [quant.sigmas[100].item(), quant.sigmas[101].item()], rel=1e-6
    )
    # add_noise uses the snapped sigma.
    x0, noise = torch.zeros(1, 1, 1, 1, 1), torch.ones(1, 1, 1, 1, 1)
    assert quant.add_noise(x0, noise, 0.0).item() == pytest.approx(_shift(0.001, 5.0), rel=1e-5)


# ---------------------------------------------------------------------------- noise / conversions


@pytest.mark.parametrize("t_kind", ["float", "0d", "B", "BF"])
def test_add_noise_broadcasting(t_kind):
    sched = FlowMatchScheduler(shift=5.0)
    B, F, C, H, W = 2, 3, 4, 2, 2
    x0, noise = torch.randn(B, F, C, H, W), torch.randn(B, F, C, H, W)
    t_bf = torch.tensor([[100.0, 200.0, 300.0], [400.0, 500.0, 900.0]])
    t = {"float": 250.0, "0d": torch.tensor(250.0), "B": t_bf[:, 0], "BF": t_bf}[t_kind]
    x_t = sched.add_noise(x0, noise, t)
    assert x_t.shape == x0.shape
    for b in range(B):
        for f in range(F):
            tv = {"float": 250.0, "0d": 250.0, "B": t_bf[b, 0].item(), "BF": t_bf[b, f].item()}[t_kind]
            s = tv / 1000
            torch.testing.assert_close(x_t[b, f], (1 - s) * x0[b, f] + s * noise[b, f])


def test_bad_timestep_shape_is_named():
    sched = FlowMatchScheduler()
    x = torch.zeros(2, 3, 4, 2, 2)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        sched.add_noise(x, x, torch.full((3,), 10.0))


def test_round_trip_and_dtype():
    sched = FlowMatchScheduler(shift=5.0)
    x0 = torch.randn(2, 3, 4, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([[900.0, 500.0, 20.0], [1000.0, 1.0, 333.0]])
    x_t = sched.add_noise(x0, noise, t)
    v = sched.training_target(x0, noise)
    torch.testing.assert_close(v, noise - x0)
    torch.testing.assert_close(sched.x0_from_flow(x_t, v, t), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sched.flow_from_x0(x_t, x0, t[:, :]), v, atol=2e-3, rtol=1e-3)
    # bf16 in, bf16 out.
    x_bf = sched.add_noise(x0.bfloat16(), noise.bfloat16(), t)
    assert x_bf.dtype == torch.bfloat16
    assert sched.x0_from_flow(x_bf, v.bfloat16(), t).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="sigma is 0"):
        sched.flow_from_x0(x_t, x0, 0.0)


def test_euler_integrates_linear_ode_exactly():
    # Along the straight path x(sigma) = (1 - sigma) x0 + sigma noise the velocity is constant, so Euler
    # over any grid (including the shifted sampler grid ending at 0) lands exactly on x0.
    sched = FlowMatchScheduler(shift=8.0)
    x0 = torch.randn(1, 2, 3, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(x0)
    ts = sched.inference_timesteps(7).tolist() + [0.0]
    x = noise.clone()
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = sched.step(noise - x0, t, x, t_next)
        torch.testing.assert_close(x, (1 - t_next / 1000) * x0 + (t_next / 1000) * noise)
    torch.testing.assert_close(x, x0)


def test_euler_step_per_frame():
    sched = FlowMatchScheduler()
    x = torch.ones(1, 2, 1, 1, 1)
    v = torch.full_like(x, 2.0)
    out = sched.step(v, torch.tensor([[1000.0, 500.0]]), x, torch.tensor([[750.0, 0.0]]))
    # x + v * (sigma_next - sigma): frame 0 -> 1 + 2 * (-0.25), frame 1 -> 1 + 2 * (-0.5)
    torch.testing.assert_close(out.flatten(), torch.tensor([0.5, 0.0]))
