"""Shared helpers for the Wan network tests: tiny configs with every parameter randomised."""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel

from wan import WanConfig
from wan.weights import official_to_diffusers


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter non-trivial random values (Wan zero-inits the head and biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            # norm weights around 1, everything else around 0
            p.copy_(noise + 1.0 if "norm" in name and name.endswith("weight") else noise)
    return module


def diffusers_twin(cfg: WanConfig, official_sd: dict[str, torch.Tensor]) -> WanTransformer3DModel:
    """A diffusers WanTransformer3DModel with the same sizes, loaded with `official_sd` (converted)."""
    ref = WanTransformer3DModel(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
    )
    missing, unexpected = ref.load_state_dict(official_to_diffusers(official_sd), strict=True)
    assert not missing and not unexpected
    return ref.eval()
