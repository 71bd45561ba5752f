"""Many-step sampler for the bidirectional teacher (ODE-pair generation, teacher samples).

The teacher integrates the probability-flow ODE ``dx/dsigma = v(x, sigma)`` from pure noise
(sigma = 1) to the clean sample (sigma = 0), with classifier-free guidance (Ho & Salimans 2022) in its
standard form ``v = v_u + g * (v_c - v_u)``.

CFG is applied to the *flow* (the network's raw output). Upstream's ODE-pair script applies it to the
x0 prediction instead (spec §7.2); at a fixed timestep ``x0 = x_t - sigma * v`` is affine in ``v`` with
the same ``x_t`` for both branches, so ``x0_u + g * (x0_c - x0_u) = x_t - sigma * (v_u + g * (v_c - v_u))``:
the two are the same update, and guiding the flow avoids a round trip through ``x0`` (which loses
precision as sigma -> 1 and cannot be inverted at sigma = 0).

Solvers:

* ``"euler"``: first-order steps on ``FlowMatchScheduler.inference_timesteps(num_steps)`` followed by a
  final step to sigma = 0. Upstream's ODE generation (48 steps, shift 8, g = 6).
* ``"unipc"``: diffusers' ``UniPCMultistepScheduler`` configured for flow prediction, given the same
  (unshifted) sigma grid, so both solvers visit the same noise levels. Upstream's bidirectional
  diffusion pipeline uses UniPC (50 steps, shift 8).

Every step is run, including the last one (upstream's few-step bidirectional pipeline skips it, §9.7).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from utils.scheduler import FlowMatchScheduler

__all__ = ["BidirectionalSampler", "SampleOutput", "Solver"]

Solver = Literal["euler", "unipc"]
_SOLVERS = ("euler", "unipc")


class _FlowModel(Protocol):
    """What the sampler needs from a `WanDiffusionWrapper`: ``(x [B,F,C,H,W], t [B], context) -> (flow, x0)``."""

    def __call__(self, noisy: Tensor, timestep: Tensor, context: Tensor) -> tuple[Tensor, Tensor]: ...


@dataclass
class SampleOutput:
    """Result of :meth:`BidirectionalSampler.sample`.

    Attributes:
        latents: the clean sample ``[B, F, C, H, W]`` (float32).
        trajectory: the ODE states at the requested indices ``[B, len(record_indices), F, C, H, W]``
            (float32, noise -> clean), or None when no indices were requested.
        timesteps: ``[num_steps + 1]`` the timestep of every state: state ``i < num_steps`` is the
            solution at ``timesteps[i]``, where step ``i`` evaluates the model (for UniPC, the estimate
            after its corrector has refined it with that evaluation); state ``num_steps`` is the final
            clean latent at t = 0.
        recorded_timesteps: ``timesteps`` at the requested indices ``[len(record_indices)]`` or None.
    """

    latents: Tensor
    trajectory: Tensor | None
    timesteps: Tensor
    recorded_timesteps: Tensor | None


class BidirectionalSampler:
    """Sampler for a bidirectional (full-attention) flow-matching DiT with classifier-free guidance.

    Args:
        model: a bidirectional `WanDiffusionWrapper` (anything with its call signature works).
        shift: the SD3 timestep shift of the sampling grid (8 for Wan's ODE pairs).
        num_steps: number of model evaluations per branch (48 upstream for ODE pairs).
        guidance_scale: ``g`` in ``v_u + g * (v_c - v_u)``; 1 disables guidance (no unconditional pass).
        solver: ``"euler"`` or ``"unipc"``.
        num_train_timesteps: the timestep scale (t = 1000 * sigma for Wan).
    """

    def __init__(
        self,
        model: _FlowModel,
        shift: float,
        num_steps: int,
        guidance_scale: float,
        solver: Solver = "euler",
        num_train_timesteps: int = 1000,
    ) -> None:
        if solver not in _SOLVERS:
            raise ValueError(f"BidirectionalSampler: unknown solver {solver!r}; choose one of {_SOLVERS}")
        if num_steps < 1:
            raise ValueError(f"BidirectionalSampler: num_steps must be >= 1, got {num_steps}")
        if getattr(model, "is_causal", False):
            raise ValueError(
                "BidirectionalSampler needs a bidirectional model; got a causal WanDiffusionWrapper"
            )
        self.model = model
        self.shift = float(shift)
        self.num_steps = int(num_steps)
        self.guidance_scale = float(guidance_scale)
        self.solver: Solver = solver
        self.scheduler = FlowMatchScheduler(shift=shift, num_train_timesteps=num_train_timesteps)

    # ------------------------------------------------------------------ grid

    def timesteps(self) -> Tensor:
        """Timesteps of the ``num_steps + 1`` ODE states (float32, high to low, last one 0)."""
        if self.solver == "euler":
            grid = self.scheduler.inference_timesteps(self.num_steps)
            return torch.cat([grid, grid.new_zeros(1)])
        sigmas = self._unipc(torch.device("cpu")).sigmas
        return (sigmas * self.scheduler.num_train_timesteps).to(torch.float32)

    def _unipc(self, device: torch.device):
        # Imported here: diffusers is heavy and only this solver needs it.
        from diffusers import UniPCMultistepScheduler

        sched = UniPCMultistepScheduler(
            num_train_timesteps=self.scheduler.num_train_timesteps,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=self.shift,
        )
        # Hand diffusers our *unshifted* sigmas (it applies flow_shift itself) so UniPC visits the same
        # noise levels as the Euler grid. It nudges sigma = 1 down by 1e-6 to keep log(alpha) finite.
        lin = torch.linspace(1.0, self.scheduler.sigma_min, self.num_steps + 1, dtype=torch.float64)[:-1]
        sched.set_timesteps(sigmas=lin.numpy(), device=device)
        # Start at index 0 explicitly: diffusers otherwise looks the first timestep up among its
        # int-rounded timesteps, which collide for fine grids.
        sched.set_begin_index(0)
        return sched

    # ------------------------------------------------------------------ model

    def _guided_flow(self, x: Tensor, t: Tensor, cond_embeds: Tensor, uncond_embeds: Tensor | None) -> Tensor:
        """CFG velocity ``v_u + g (v_c - v_u)`` at latents ``x [B,F,C,H,W]`` and timestep ``t`` ([B]), float32."""
        flow_c = self.model(x, t, cond_embeds)[0].float()
        if uncond_embeds is None:
            return flow_c
        # Two separate passes (not one 2B batch): half the activation memory for the 1.3B/14B
        # teacher at 32760 tokens, and each branch sees exactly the batch it would see alone.
        flow_u = self.model(x, t, uncond_embeds)[0].float()
        return flow_u + self.guidance_scale * (flow_c - flow_u)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(
        self,
        noise: Tensor,
        cond_embeds: Tensor,
        uncond_embeds: Tensor | None = None,
        record_indices: Sequence[int] | None = None,
    ) -> SampleOutput:
        """Integrate from ``noise`` to a clean sample.

        Args:
            noise: ``[B, F, C, H, W]`` Gaussian noise (the state at t = 1000). Both solvers are
                deterministic, so all randomness is in ``noise``.
            cond_embeds: ``[B, L, text_dim]`` prompt embeddings.
            uncond_embeds: ``[B or 1, L', text_dim]`` negative-prompt embeddings; required unless
                ``guidance_scale == 1``.
            record_indices: indices into the ``num_steps + 1`` states to return as the trajectory
                (Python-style negatives: -1 is the final clean latent), in increasing order.
        Returns:
            :class:`SampleOutput`.
        """
        if noise.ndim != 5:
            raise ValueError(f"BidirectionalSampler: noise must be [B, F, C, H, W], got {tuple(noise.shape)}")
        batch = noise.shape[0]
        if cond_embeds.ndim != 3 or cond_embeds.shape[0] != batch:
            raise ValueError(
                f"BidirectionalSampler: cond_embeds must be [B={batch}, L, D], got {tuple(cond_embeds.shape)}"
            )
        if self.guidance_scale != 1.0:
            if uncond_embeds is None:
                raise ValueError(
                    f"BidirectionalSampler: guidance_scale={self.guidance_scale} needs uncond_embeds"
                )
            if uncond_embeds.ndim != 3 or uncond_embeds.shape[0] not in (1, batch):
                raise ValueError(
                    f"BidirectionalSampler: uncond_embeds must be [1 or B={batch}, L, D], "
                    f"got {tuple(uncond_embeds.shape)}"
                )
            uncond_embeds = uncond_embeds.expand(batch, -1, -1)
        else:
            uncond_embeds = None

        timesteps = self.timesteps()
        record = self._normalise_indices(record_indices)
        states = self._run(noise.float(), cond_embeds, uncond_embeds, set(record))
        latents = states[self.num_steps]
        trajectory = torch.stack([states[i] for i in record], dim=1) if record else None
        recorded = timesteps[record] if record else None
        return SampleOutput(latents, trajectory, timesteps, recorded)

    def _normalise_indices(self, record_indices: Sequence[int] | None) -> list[int]:
        if not record_indices:
            return []
        n_states = self.num_steps + 1
        out = []
        for i in record_indices:
            if not -n_states <= i < n_states:
                raise ValueError(
                    f"record index {i} out of range for {n_states} states ({self.num_steps} steps + final)"
                )
            out.append(i % n_states)
        if any(b <= a for a, b in zip(out, out[1:])):
            raise ValueError(
                f"record indices must be strictly increasing (noise -> clean), got {list(record_indices)}"
            )
        return out

    def _run(self, x: Tensor, cond: Tensor, uncond: Tensor | None, keep: set[int]) -> dict[int, Tensor]:
        """The solver loop; returns the states whose index is in ``keep`` plus the final one."""
        batch = x.shape[0]
        states: dict[int, Tensor] = {}
        if self.solver == "euler":
            grid = self.scheduler.inference_timesteps(self.num_steps).to(x.device)
            grid_next = torch.cat([grid[1:], grid.new_zeros(1)])
            for i in range(self.num_steps):
                if i in keep:
                    states[i] = x
                t = grid[i].expand(batch)
                v = self._guided_flow(x, t, cond, uncond)
                x = self.scheduler.step(v, grid[i], x, grid_next[i])
        else:
            sched = self._unipc(x.device)
            for i in range(self.num_steps):
                # Evaluate the model at the exact sigma UniPC uses (its `timesteps` are int-rounded).
                t = (sched.sigmas[i] * self.scheduler.num_train_timesteps).to(x.device, torch.float32)
                v = self._guided_flow(x, t.expand(batch), cond, uncond)
                x = sched.step(v, sched.timesteps[i], x, return_dict=False)[0]
                if i in keep:
                    # UniPC's corrector refines state i with the model output just computed; record
                    # the refined state (diffusers keeps it as `last_sample`).
                    states[i] = sched.last_sample
        states[self.num_steps] = x
        return states
