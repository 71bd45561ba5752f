"""A user's own components, given to the trainer only by their dotted paths (tests/test_components.py).

`GaussianTeacher` is a closed-form real score: for data x0 ~ N(0, variance I) and flow matching's
`x_t = (1 - s) x0 + s * noise` (s = t / 1000), the posterior mean is linear in x_t,

    E[x0 | x_t] = (1 - s) variance / ((1 - s)^2 variance + s^2) * x_t,

and the flow is `(x_t - x0_hat) / s`. It ignores the prompt (the data does not depend on it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GaussianTeacher(nn.Module):
    """(noisy `[B, F, C, H, W]`, t `[B, F]` | `[B]`, context `[B, L, D]`) -> (flow, x0)."""

    calls = 0  # forward passes, over every instance: the test checks the trainer used it

    def __init__(self, variance: float = 1.0) -> None:
        super().__init__()
        self.variance = variance

    def forward(self, noisy: Tensor, t: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        GaussianTeacher.calls += 1
        s = (t.float() / 1000.0).clamp_min(1e-4)
        s = s.reshape(*s.shape, *([1] * (noisy.dim() - s.dim())))
        x0 = (1 - s) * self.variance / ((1 - s) ** 2 * self.variance + s**2) * noisy
        return ((noisy - x0) / s).to(noisy.dtype), x0.to(noisy.dtype)


class OneArgument(nn.Module):
    """Lacks the real score's interface: forward takes one tensor."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def not_a_network() -> str:
    return "neither a WanConfig nor a module"


class WideTextTable(nn.Module):
    """A text encoder whose embeddings are wider than the tiny generator's text_dim (32)."""

    def forward(self, prompts: list[str]) -> dict[str, Tensor]:
        return {"prompt_embeds": torch.zeros(len(prompts), 4, 33)}


class EncodeOnly(nn.Module):
    """A codec without decode()."""

    def encode(self, videos: Tensor) -> Tensor:
        return videos
