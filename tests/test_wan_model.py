"""Fidelity of the bidirectional WanModel: equal to diffusers' WanTransformer3DModel on the same weights."""

from __future__ import annotations

import pytest
import torch

from tests.wan_helpers import diffusers_twin, randomize_
from wan import CausalWanModel, WanConfig, WanModel

TINY = WanConfig.preset("tiny")


def _pad_text(c: torch.Tensor, text_len: int) -> torch.Tensor:
    return torch.cat([c, c.new_zeros(c.shape[0], text_len - c.shape[1], c.shape[2])], dim=1)


@pytest.mark.parametrize(
    "cfg, batch, frames, hw, text",
    [
        (TINY, 1, 1, (4, 4), 16),
        (TINY, 2, 3, (4, 6), 10),  # non-square, text shorter than text_len
        (TINY.replace(num_heads=3, dim=36, ffn_dim=40, num_layers=3), 2, 5, (6, 2), 7),
        (TINY.replace(num_heads=1), 1, 2, (2, 8), 3),  # head_dim 24: RoPE split [8, 8, 8]
    ],
)
def test_bidirectional_equals_diffusers(cfg, batch, frames, hw, text):
    torch.manual_seed(1)
    ours = randomize_(WanModel(cfg).eval(), seed=3)
    ref = diffusers_twin(cfg, ours.state_dict())
    x = torch.randn(batch, cfg.in_dim, frames, *hw)
    t = torch.rand(batch) * 1000
    c = torch.randn(batch, text, cfg.text_dim)
    with torch.no_grad():
        y = ours(x, t, c)
        y_ref = ref(x, t, _pad_text(c, cfg.text_len)).sample
    assert y.shape == x.shape[:1] + (cfg.out_dim,) + x.shape[2:]
    assert (y - y_ref).abs().max() <= 1e-5 * max(1.0, y_ref.abs().max().item())


def test_per_frame_timesteps_equal_diffusers_per_token_timesteps():
    # diffusers accepts one timestep per token ([B, L]); per-frame timesteps are the same per token.
    cfg = TINY
    ours = randomize_(WanModel(cfg).eval(), seed=5)
    ref = diffusers_twin(cfg, ours.state_dict())
    b, f, h, w = 2, 3, 4, 4
    x = torch.randn(b, cfg.in_dim, f, h, w)
    t = torch.rand(b, f) * 1000
    c = torch.randn(b, cfg.text_len, cfg.text_dim)
    per_token = t.repeat_interleave((h // 2) * (w // 2), dim=1)
    with torch.no_grad():
        y = ours(x, t, c)
        y_ref = ref(x, per_token, c).sample
    assert (y - y_ref).abs().max() <= 1e-5 * max(1.0, y_ref.abs().max().item())


def test_causal_with_one_block_equals_bidirectional():
    # One block spanning every frame makes the block-causal mask all-true.
    f = 4
    bi = randomize_(WanModel(TINY).eval(), seed=7)
    causal = CausalWanModel(TINY, num_frame_per_block=f).eval()
    causal.load_state_dict(bi.state_dict())
    x = torch.randn(2, TINY.in_dim, f, 4, 4)
    t = torch.rand(2, f) * 1000
    c = torch.randn(2, 5, TINY.text_dim)
    with torch.no_grad():
        assert torch.allclose(bi(x, t, c), causal(x, t, c), atol=1e-5, rtol=0)


def test_same_keys_as_official_layout():
    keys = set(WanModel(TINY).state_dict())
    assert keys == set(CausalWanModel(TINY).state_dict())
    expected_block = {
        "modulation",
        "norm3.weight",
        "norm3.bias",
        *(f"{a}.{p}.{w}" for a in ("self_attn", "cross_attn") for p in "qkvo" for w in ("weight", "bias")),
        *(f"{a}.norm_{p}.weight" for a in ("self_attn", "cross_attn") for p in "qk"),
        *(f"ffn.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")),
    }
    top = {
        "patch_embedding.weight",
        "patch_embedding.bias",
        *(
            f"{m}.{i}.{w}"
            for m in ("text_embedding", "time_embedding")
            for i in (0, 2)
            for w in ("weight", "bias")
        ),
        "time_projection.1.weight",
        "time_projection.1.bias",
        "head.modulation",
        "head.head.weight",
        "head.head.bias",
    }
    expected = top | {f"blocks.{i}.{k}" for i in range(TINY.num_layers) for k in expected_block}
    assert keys == expected


@pytest.mark.parametrize("name, billions", [("wan2.1-t2v-1.3b", 1.419), ("wan2.1-t2v-14b", 14.29)])
def test_preset_parameter_counts(name, billions):
    with torch.device("meta"):
        model = WanModel(WanConfig.preset(name))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e9 - billions) < 0.005, n


def test_rope_split_of_head_dim_128():
    cfg = WanConfig.preset("wan2.1-t2v-1.3b")
    assert cfg.rope_dims == (44, 42, 42)  # 22/21/21 complex pairs (spec appendix A)
    assert cfg.tokens_per_frame(60, 104) == 1560


def test_text_longer_than_text_len_is_an_error():
    model = WanModel(TINY)
    with pytest.raises(ValueError, match="text_len"):
        model(
            torch.randn(1, 4, 1, 2, 2), torch.tensor([1.0]), torch.randn(1, TINY.text_len + 1, TINY.text_dim)
        )
