"""The shapes world's network: the sizes of the Wan DiT every role of the chain trains.

Configs name it as a component (`generator_model: {_component_: world.network.wan_config}`), so
the core builds it like any Wan network: on meta, sharded, from its seeded initialisation when no
checkpoint is given (the world's networks are trained from scratch).
"""

from __future__ import annotations

from typing import Any

from wan import WanConfig

# 16x16 RGB pixel-unshuffled by 4 -> 48 x 4 x 4 latents, patch 1x1x1 (16 tokens per frame). Wan has
# only relative (RoPE) positions; this world needs absolute ones (objects start at the centre and
# bounce off the walls), hence fixed sin/cos position features. The recipe was chosen by
# `python3 -m world.sweep` (README, "The shapes world"): width 128 (dim 64 could not render the
# object sharply), the prompt also in the adaLN path, x0 prediction.
NETWORK = WanConfig(
    dim=128,
    ffn_dim=512,
    num_heads=4,
    num_layers=2,
    patch_size=(1, 1, 1),
    in_dim=48,
    out_dim=48,
    text_len=8,
    text_dim=32,
    freq_dim=64,
    rope_theta=10.0,
    pos_embed_frames=12,  # the training length: every trained frame has its own row
    pos_embed_grid=(4, 4),
    pos_embed_type="sincos",
    text_time_embedding=True,
    predict_x0=True,
    qk_norm_init=2.0,
    zero_init_gates=True,
)


def wan_config(**changes: Any) -> WanConfig:
    """`NETWORK` with `changes` (WanConfig fields) applied: the component a world config names."""
    return NETWORK.replace(**changes)
