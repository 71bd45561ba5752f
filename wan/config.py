"""Typed configuration of the Wan2.1 DiT, with presets.

Every size used anywhere (tokens per frame, heads, head dim, text length, block count) derives from
this dataclass; nothing else in the codebase hard-codes the 1.3B geometry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class WanConfig:
    """Hyper-parameters of a Wan2.1 text-to-video DiT (spec §1.1)."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_dim: int = 16
    out_dim: int = 16
    text_len: int = 512
    text_dim: int = 4096
    freq_dim: int = 256
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    # Options for small networks trained from scratch (the shapes domain's, see the README); the
    # defaults are Wan2.1's, so official checkpoints load exactly as before.
    rope_theta: float = 10000.0  # RoPE base; a small base gives short grids distinguishable angles
    # Learned absolute position embedding added to the patch tokens: `pos_embed_frames` frame rows
    # (frame f uses row min(f, pos_embed_frames - 1), so any length runs: every frame past the table
    # shares its last row, which training already saw at every later position) plus one row per token
    # row and column of a `pos_embed_grid` token grid. 0 / (0, 0): none (Wan2.1 has only RoPE).
    pos_embed_frames: int = 0
    pos_embed_grid: tuple[int, int] = (0, 0)
    # "learned": trained rows (initialised at std 0.02, ViT-style); "sincos": fixed sin/cos features of
    # each axis (DiT-style, no parameters), at the scale of the patch tokens from the first step, so
    # the network can place things by position without first having to grow its position rows.
    pos_embed_type: str = "learned"
    # "sincos" only: frames past the table get sin/cos rows of their own (periods still fixed by
    # pos_embed_frames, so rows 0..pos_embed_frames-1 are unchanged) instead of sharing the last row. For
    # a run that trains past its base's length (an image-to-video layout of 1 + 12 frames on a 12-frame
    # base), so its last frames stay apart.
    pos_embed_extrapolate: bool = False
    # False: the absolute embedding places tokens in the grid only (row and column); frames are told
    # apart by RoPE alone, which sees only frame offsets, so a rolling window past the training length
    # shows the network no position it has not seen (pos_embed_frames then only sizes the unused table).
    pos_embed_frame_rows: bool = True
    # Add an embedding of the pooled prompt to the time embedding, so the prompt also reaches every
    # block through the adaLN modulation (not only through cross-attention).
    text_time_embedding: bool = False
    # The head predicts the clean latents x0 and the network returns the flow (x_t - x0) / sigma
    # (sigma = t / 1000), so callers still see Wan's flow interface. A flow target carries the input's
    # noise, which a narrow network must pass through its residual stream; an x0 target does not.
    predict_x0: bool = False
    qk_norm_init: float = 1.0  # initial q/k RMSNorm weight (sharper attention at start when > 1)
    zero_init_gates: bool = False  # adaLN-Zero: residual gates start at 0, every block starts as identity

    def __post_init__(self) -> None:
        if self.dim % self.num_heads != 0:
            raise ValueError(f"WanConfig: dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"WanConfig: head_dim={self.head_dim} must be even for RoPE")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        object.__setattr__(self, "pos_embed_grid", tuple(int(p) for p in self.pos_embed_grid))
        if (self.pos_embed_frames > 0) != all(g > 0 for g in self.pos_embed_grid):
            raise ValueError(
                f"WanConfig: pos_embed_frames={self.pos_embed_frames} and pos_embed_grid={self.pos_embed_grid} "
                "must be set together (both > 0) or not at all"
            )
        if self.pos_embed_type not in ("learned", "sincos"):
            raise ValueError(
                f"WanConfig: pos_embed_type must be 'learned' or 'sincos', got {self.pos_embed_type!r}"
            )
        if self.pos_embed_extrapolate and self.pos_embed_type != "sincos":
            raise ValueError(
                "WanConfig: pos_embed_extrapolate needs pos_embed_type='sincos' (a learned table has no "
                "rows past its end)"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Real RoPE sub-dimensions per axis (time, height, width), spec §1.4: [44, 42, 42] for d=128."""
        hw = 2 * (self.head_dim // 6)
        return (self.head_dim - 2 * hw, hw, hw)

    def tokens_per_frame(self, latent_h: int, latent_w: int) -> int:
        """Number of DiT tokens one latent frame of size (latent_h, latent_w) becomes."""
        _, ph, pw = self.patch_size
        if latent_h % ph or latent_w % pw:
            raise ValueError(f"latent size {latent_h}x{latent_w} is not divisible by patch {ph}x{pw}")
        return (latent_h // ph) * (latent_w // pw)

    def frames_per_patch(self) -> int:
        return self.patch_size[0]

    def replace(self, **changes) -> WanConfig:
        return dataclasses.replace(self, **changes)

    @staticmethod
    def preset(name: str) -> WanConfig:
        """Return a named preset: "wan2.1-t2v-1.3b", "wan2.1-t2v-14b" or "tiny"."""
        key = name.lower().replace("_", "-")
        aliases = {"1.3b": "wan2.1-t2v-1.3b", "14b": "wan2.1-t2v-14b"}
        key = aliases.get(key, key)
        if key not in PRESETS:
            raise KeyError(f"unknown Wan preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[key]


PRESETS: dict[str, WanConfig] = {
    # Wan2.1-T2V-1.3B: ~1.419 B parameters.
    "wan2.1-t2v-1.3b": WanConfig(),
    # Wan2.1-T2V-14B: ~14.29 B parameters.
    "wan2.1-t2v-14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # CPU test preset: 2 layers, 2 heads of dim 12 (RoPE split [4, 4, 4]), short text.
    "tiny": WanConfig(
        dim=24,
        ffn_dim=48,
        num_heads=2,
        num_layers=2,
        in_dim=4,
        out_dim=4,
        text_len=16,
        text_dim=32,
        freq_dim=16,
    ),
}
