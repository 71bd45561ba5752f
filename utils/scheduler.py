"""Rectified-flow ("flow matching") scheduler used by Wan2.1 and Self-Forcing.

Conventions (docs/DESIGN.md):

* ``t`` is a timestep on the ``0..num_train_timesteps`` scale, ``sigma`` the noise level in ``[0, 1]``.
* ``x_t = (1 - sigma) * x0 + sigma * noise``; the network predicts the velocity ``v = noise - x0``,
  so ``x0 = x_t - sigma * v`` (Lipman et al. 2023, Liu et al. 2023; Wan2.1 §3.1).
* The "shift" warps a uniform sigma towards the noisy end: ``S(sigma) = s*sigma / (1 + (s-1)*sigma)``
  (SD3, Esser et al. 2024, eq. 23).

By default ``sigma = t / num_train_timesteps`` exactly. ``quantize=True`` reproduces upstream, which
snaps every ``t`` to the nearest point of its 1000-point training grid before reading sigma (so
``t = 0`` never means clean; see the spec §3 and §9.10-11).

Timestep tensors broadcast against latents ``[B, F, C, H, W]``: a scalar applies everywhere, ``[B]``
per sample, ``[B, F]`` per frame.
"""

from __future__ import annotations

import torch
from torch import Tensor

TimestepLike = Tensor | float | int

__all__ = ["FlowMatchScheduler", "TimestepLike"]


class FlowMatchScheduler:
    """Flow-matching noise schedule, conversions and Euler sampler grid.

    Args:
        shift: the SD3 shift ``s`` (Wan uses 5.0 for the generator, 8.0 for the teacher/critic).
        num_train_timesteps: ``T``; timesteps run over ``[0, T]`` and ``sigma = t / T``.
        sigma_min: the sigma at which the (un-shifted) grids stop; 0 for Wan.
        quantize: snap ``t`` to the nearest training-grid timestep when computing sigma (upstream).

    Attributes:
        sigmas: ``[T]`` float64 training grid, from 1 down to its smallest shifted value.
        timesteps: ``[T]`` float64, ``T * sigmas``.
    """

    def __init__(
        self,
        shift: float = 5.0,
        num_train_timesteps: int = 1000,
        sigma_min: float = 0.0,
        quantize: bool = False,
    ) -> None:
        if shift <= 0:
            raise ValueError(f"FlowMatchScheduler: shift must be > 0, got {shift}")
        if num_train_timesteps < 1:
            raise ValueError(
                f"FlowMatchScheduler: num_train_timesteps must be >= 1, got {num_train_timesteps}"
            )
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"FlowMatchScheduler: sigma_min must be in [0, 1), got {sigma_min}")
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)
        self.sigma_min = float(sigma_min)
        self.quantize = bool(quantize)

        # Upstream builds the training grid with ``extra_one_step``: T+1 evenly spaced points from 1 to
        # sigma_min with the last (clean) one dropped, then shifted.
        self.sigmas = self._shifted_grid(self.num_train_timesteps, sigma_start=1.0)
        self.timesteps = self.sigmas * self.num_train_timesteps

        # Training weights (upstream diffusion trainer): a Gaussian bump in t centred on T/2, its
        # minimum over the grid subtracted, normalised so the grid mean is exactly 1.
        half = self.num_train_timesteps / 2
        bump = torch.exp(-2.0 * ((self.timesteps - half) / self.num_train_timesteps) ** 2)
        bump = bump - bump.min()
        self.linear_timesteps_weights = bump * (self.num_train_timesteps / bump.sum())

    # ------------------------------------------------------------------ grids

    def shift_sigma(self, sigma: Tensor | float) -> Tensor:
        """``S(sigma) = s*sigma / (1 + (s-1)*sigma)``; returns float64 for a Python input."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return self.shift * sigma / (1.0 + (self.shift - 1.0) * sigma)

    def _shifted_grid(self, num_steps: int, sigma_start: float) -> Tensor:
        lin = torch.linspace(sigma_start, self.sigma_min, num_steps + 1, dtype=torch.float64)[:-1]
        return self.shift_sigma(lin)

    def warp(self, step_list: list[float] | list[int] | Tensor) -> Tensor:
        """Map a ``denoising_step_list`` in un-shifted units through the shift: ``t(L) = T*S(L/T)``.

        ``[1000, 750, 500, 250]`` becomes ``[1000, 937.5, 833.33, 625]`` for shift 5; 0 stays 0.
        Returns float32 ``[len(step_list)]``.
        """
        steps = torch.as_tensor(step_list, dtype=torch.float64)
        if steps.ndim != 1:
            raise ValueError(f"warp: step_list must be 1-D, got shape {tuple(steps.shape)}")
        if (steps < 0).any() or (steps > self.num_train_timesteps).any():
            raise ValueError(
                f"warp: step_list entries must lie in [0, {self.num_train_timesteps}], got {steps.tolist()}"
            )
        warped = self.num_train_timesteps * self.shift_sigma(steps / self.num_train_timesteps)
        return warped.to(torch.float32)

    def inference_timesteps(self, num_steps: int, denoising_strength: float = 1.0) -> Tensor:
        """Timesteps of the ``num_steps``-step Euler sampler, high to low: float32 ``[num_steps]``.

        ``num_steps + 1`` evenly spaced sigmas from ``sigma_start`` to ``sigma_min`` with the last one
        dropped (the sampler steps from the final entry to 0), shifted, times ``T``.
        """
        if num_steps < 1:
            raise ValueError(f"inference_timesteps: num_steps must be >= 1, got {num_steps}")
        if not 0.0 < denoising_strength <= 1.0:
            raise ValueError(
                f"inference_timesteps: denoising_strength must be in (0, 1], got {denoising_strength}"
            )
        sigma_start = self.sigma_min + (1.0 - self.sigma_min) * denoising_strength
        sigmas = self._shifted_grid(num_steps, sigma_start)
        return (sigmas * self.num_train_timesteps).to(torch.float32)

    # ------------------------------------------------------------------ sigma lookup

    def _nearest_grid_index(self, t: Tensor) -> Tensor:
        grid = self.timesteps.to(device=t.device)
        return (t.to(torch.float64).unsqueeze(-1) - grid).abs().argmin(dim=-1)

    def _sigma64(self, t: TimestepLike, device: torch.device | None = None) -> Tensor:
        t = torch.as_tensor(t, device=device)
        if self.quantize:
            return self.sigmas.to(t.device)[self._nearest_grid_index(t)]
        return t.to(torch.float64) / self.num_train_timesteps

    def sigma(self, t: TimestepLike) -> Tensor:
        """Noise level for timestep(s) ``t`` (any shape), float32 (float64 if ``t`` is float64)."""
        t_tensor = torch.as_tensor(t)
        out_dtype = torch.float64 if t_tensor.dtype == torch.float64 else torch.float32
        return self._sigma64(t_tensor).to(out_dtype)

    def training_weight(self, t: TimestepLike) -> Tensor:
        """Per-timestep loss weight (nearest training-grid point), same shape as ``t``, float32."""
        t_tensor = torch.as_tensor(t)
        weights = self.linear_timesteps_weights.to(t_tensor.device)
        return weights[self._nearest_grid_index(t_tensor)].to(torch.float32)

    # ------------------------------------------------------------------ broadcasting

    @staticmethod
    def _expand_to(sigma: Tensor, x: Tensor) -> Tensor:
        """Reshape ``sigma`` ([], [B] or [B, F]) so it broadcasts against ``x`` ([B, F, C, H, W])."""
        if sigma.ndim > x.ndim:
            raise ValueError(
                f"timestep shape {tuple(sigma.shape)} has more dims than latents {tuple(x.shape)}"
            )
        for dim, (ts, xs) in enumerate(zip(sigma.shape, x.shape)):
            if ts not in (1, xs):
                raise ValueError(
                    f"timestep shape {tuple(sigma.shape)} does not match latents {tuple(x.shape)} "
                    f"at dim {dim}; expected a scalar, [B] or [B, F]"
                )
        return sigma.reshape(*sigma.shape, *([1] * (x.ndim - sigma.ndim)))

    def _broadcast_sigma(self, t: TimestepLike, x: Tensor, dtype: torch.dtype) -> Tensor:
        return self._expand_to(self._sigma64(t, device=x.device), x).to(dtype)

    # ------------------------------------------------------------------ forward process & conversions

    def add_noise(self, x0: Tensor, noise: Tensor, t: TimestepLike) -> Tensor:
        """``x_t = (1 - sigma) * x0 + sigma * noise``; latents ``[B, F, C, H, W]``, result in noise's dtype."""
        if x0.shape != noise.shape:
            raise ValueError(f"add_noise: x0 shape {tuple(x0.shape)} != noise shape {tuple(noise.shape)}")
        compute = torch.promote_types(noise.dtype, torch.float32)
        sigma = self._broadcast_sigma(t, x0, compute)
        x_t = (1.0 - sigma) * x0.to(compute) + sigma * noise.to(compute)
        return x_t.to(noise.dtype)

    @staticmethod
    def training_target(x0: Tensor, noise: Tensor) -> Tensor:
        """Velocity target ``v = noise - x0`` ([B, F, C, H, W])."""
        return noise - x0

    def x0_from_flow(self, x_t: Tensor, flow: Tensor, t: TimestepLike) -> Tensor:
        """``x0 = x_t - sigma * v`` computed in float64, returned in ``flow``'s dtype ([B, F, C, H, W])."""
        sigma = self._broadcast_sigma(t, x_t, torch.float64)
        return (x_t.double() - sigma * flow.double()).to(flow.dtype)

    def flow_from_x0(self, x_t: Tensor, x0: Tensor, t: TimestepLike) -> Tensor:
        """``v = (x_t - x0) / sigma`` computed in float64, returned in ``x0``'s dtype.

        Undefined at ``sigma = 0`` (a clean sample carries no velocity information): raises there.
        """
        sigma = self._broadcast_sigma(t, x_t, torch.float64)
        if (sigma == 0).any():
            raise ValueError("flow_from_x0: sigma is 0 for some timestep; the velocity is undefined at t=0")
        return ((x_t.double() - x0.double()) / sigma).to(x0.dtype)

    def step(self, flow: Tensor, t: TimestepLike, x: Tensor, t_next: TimestepLike) -> Tensor:
        """One Euler step of ``dx/dsigma = v`` from ``t`` to ``t_next``: ``x + v * (sigma_next - sigma)``.

        Uses ``sigma = t / T`` exactly even when ``quantize`` is set: upstream's sampler steps along its
        own inference grid and never snaps to the training grid, so ``t_next = 0`` lands on the clean
        sample. Latents ``[B, F, C, H, W]``; computed in at least float32, returned in ``x``'s dtype.
        """
        sigma = self._expand_to(torch.as_tensor(t, device=x.device).double() / self.num_train_timesteps, x)
        sigma_next = self._expand_to(
            torch.as_tensor(t_next, device=x.device).double() / self.num_train_timesteps, x
        )
        compute = torch.promote_types(x.dtype, torch.float32)
        delta = (sigma_next - sigma).to(compute)
        return (x.to(compute) + flow.to(compute) * delta).to(x.dtype)
