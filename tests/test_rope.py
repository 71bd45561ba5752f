"""RoPE: the cached fp32 rotation against the reference float64 formula (spec §1.4), on tiny and large.

The reference below is written out here, independent of wan/modules.py: per-axis angles
`pos * theta^(-2i/d_axis)` for (time from the start frame, height, width), concatenated per token in
frame-major order, and channel pairs rotated in float64 as `(x1 cos - x2 sin, x1 sin + x2 cos)`.
"""

from __future__ import annotations

import pytest
import torch

import wan.modules as wm
from tests.wan_helpers import randomize_
from wan import CausalWanModel, CrossAttentionCache, KVCache, WanConfig, WanModel
from wan.modules import ROPE_TABLES, Rope

TINY = WanConfig.preset("tiny")
LARGE = WanConfig().replace(dim=256, ffn_dim=1024, num_heads=8, num_layers=4)  # head dim 32: [12, 10, 10]


def reference_angles(
    cfg: WanConfig, f: int, h: int, w: int, start: int, theta: float = 10000.0
) -> torch.Tensor:
    d = cfg.head_dim
    hw = 2 * (d // 6)
    dims = (d - 2 * hw, hw, hw)  # spec §1.4: time gets the remainder
    rows = []
    for fi in range(f):
        for hi in range(h):
            for wi in range(w):
                row = []
                for axis_dim, pos in zip(dims, (start + fi, hi, wi), strict=True):
                    i = torch.arange(axis_dim // 2, dtype=torch.float64)
                    row.append(pos * theta ** (-2 * i / axis_dim))
                rows.append(torch.cat(row))
    return torch.stack(rows)  # [L, d/2]


def reference_rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """The reference implementation's float64 rotation of `[B, L, H, D]`, cast back to x's dtype."""
    xd = x.double()
    x1, x2 = xd[..., 0::2], xd[..., 1::2]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    out = torch.empty_like(xd)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.to(x.dtype)


class ReferenceRope:
    """Drop-in for `Rope` that rotates with the reference float64 formula (for model-level comparisons)."""

    def __init__(self, angles: torch.Tensor) -> None:
        self.angles = angles

    @classmethod
    def for_grid(cls, cfg, grid, start_frame, device, dtype, theta=10000.0):
        return cls(reference_angles(cfg, *grid, start_frame, theta).to(device))

    def repeat(self, times: int):
        return ReferenceRope(self.angles.repeat(times, 1))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return reference_rotate(x, self.angles)


@pytest.mark.parametrize(
    "cfg, grid, start", [(TINY, (3, 4, 6), 0), (TINY, (2, 3, 5), 7), (LARGE, (3, 8, 8), 18)]
)
def test_fp32_rotation_within_1e5_of_float64_reference(cfg, grid, start):
    g = torch.Generator().manual_seed(0)
    tokens = grid[0] * grid[1] * grid[2]
    x = torch.randn(2, tokens, cfg.num_heads, cfg.head_dim, generator=g) * 3
    ours = Rope.for_grid(cfg, grid, start, x.device, x.dtype).apply(x)
    ref = reference_rotate(x, reference_angles(cfg, *grid, start))
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max() <= 1e-5 * x.abs().max()
    # float64 inputs rotate in float64: the reference to rounding
    ours64 = Rope.for_grid(cfg, grid, start, x.device, torch.float64).apply(x.double())
    assert torch.allclose(
        ours64, reference_rotate(x.double(), reference_angles(cfg, *grid, start)), atol=1e-12
    )


def test_theta_is_a_parameter():
    x = torch.randn(1, 2 * 3 * 4, TINY.num_heads, TINY.head_dim)
    for theta in (10000.0, 500.0):
        ours = Rope.for_grid(TINY, (2, 3, 4), 1, x.device, x.dtype, theta=theta).apply(x)
        ref = reference_rotate(x, reference_angles(TINY, 2, 3, 4, 1, theta))
        assert (ours - ref).abs().max() <= 1e-5 * x.abs().max()


def test_table_cache_is_keyed_by_every_input():
    ROPE_TABLES.clear()
    a = ROPE_TABLES.get(TINY, (3, 2, 2), 0, "cpu", torch.float32, 10000.0)
    assert ROPE_TABLES.get(TINY, (3, 2, 2), 0, "cpu", torch.float32, 10000.0) is a  # reused
    assert ROPE_TABLES.get(TINY, (3, 2, 2), 0, "cpu", torch.bfloat16, 10000.0) is a  # both rotate in fp32
    for other in (
        ROPE_TABLES.get(TINY, (3, 2, 2), 3, "cpu", torch.float32, 10000.0),  # start frame
        ROPE_TABLES.get(TINY, (3, 2, 3), 0, "cpu", torch.float32, 10000.0),  # grid
        ROPE_TABLES.get(TINY, (3, 2, 2), 0, "cpu", torch.float64, 10000.0),  # dtype
        ROPE_TABLES.get(TINY, (3, 2, 2), 0, "cpu", torch.float32, 500.0),  # theta
        ROPE_TABLES.get(LARGE, (3, 2, 2), 0, "cpu", torch.float32, 10000.0),  # head split
    ):
        assert other is not a
    with torch.inference_mode():  # a table first built under inference_mode is usable with grad later
        ROPE_TABLES.clear()
        Rope.for_grid(TINY, (1, 2, 2), 0, "cpu", torch.float32)
    x = torch.randn(1, 4, TINY.num_heads, TINY.head_dim, requires_grad=True)
    Rope.for_grid(TINY, (1, 2, 2), 0, "cpu", torch.float32).apply(x).sum().backward()
    assert x.grad is not None


def _rollout(model, x, c, n):
    b, _, f, h, w = x.shape
    kv = KVCache.for_model(model, b, (h, w), f)
    xc = CrossAttentionCache.for_model(model)
    outs = []
    for s in range(0, f, n):
        t = torch.full((b, n), 700.0)
        outs.append(model(x[:, :, s : s + n], t, c, kv_cache=kv, crossattn_cache=xc, current_start_frame=s))
        model(x[:, :, s : s + n], t * 0, c, kv_cache=kv, crossattn_cache=xc, current_start_frame=s)
    return torch.cat(outs, 2)


@pytest.mark.parametrize("cfg, frames, hw", [(TINY, 6, (4, 6)), (LARGE, 6, (8, 8))])
def test_models_match_the_float64_rope_reference(cfg, frames, hw, monkeypatch):
    # Whole networks (bidirectional, causal training path, cached rollout) with the fp32 rotation
    # against the same networks rotating with the reference float64 formula.
    causal = randomize_(CausalWanModel(cfg, num_frame_per_block=3).eval(), scale=0.1)
    bidi = randomize_(WanModel(cfg).eval(), scale=0.1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.in_dim, frames, *hw, generator=g)
    c = torch.randn(1, 5, cfg.text_dim, generator=g)
    t = torch.full((1, frames), 600.0)

    def run():
        with torch.no_grad():
            return bidi(x, t[:, 0], c), causal(x, t, c), _rollout(causal, x, c, 3)

    ours = run()
    monkeypatch.setattr(wm, "Rope", ReferenceRope)
    monkeypatch.setattr("wan.model.Rope", ReferenceRope)
    monkeypatch.setattr("wan.causal_model.Rope", ReferenceRope)
    ref = run()
    for a, b in zip(ours, ref, strict=True):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())
