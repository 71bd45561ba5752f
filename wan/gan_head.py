"""Classification branch that turns a bidirectional Wan critic into a GAN discriminator (spec §1.10).

After a few tap blocks of the DiT, a learned register token reads the hidden video tokens through
one cross-attention block each; the read-out tokens (optionally with the time embedding) go through
a small MLP to `num_class` logits.

The modules are attached to the critic's `WanDiffusionWrapper` under upstream's attribute names
(`_register_tokens`, `_gan_ca_blocks`, `_cls_pred_branch`), so the critic's state dict has upstream's
keys. Sizes derive from the DiT config instead of upstream's hard-coded 1.3B widths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from .attention import attention
from .model import WanModel
from .modules import LayerNorm32, RMSNorm, WanSelfAttention

__all__ = [
    "GanAttentionBlock",
    "RegisterTokens",
    "add_gan_head",
    "default_tap_layers",
    "GAN_HEAD_MODULES",
    "classify_forward",
    "gan_head_parameter_names",
    "gan_logits",
    "has_gan_head",
]

# Upstream taps blocks 13, 21 and 29 of the 30-block 1.3B critic, i.e. the blocks that end at 14/30,
# 22/30 and 30/30 of the depth; we keep those relative depths for any depth.
UPSTREAM_TAP_DEPTHS = (14 / 30, 22 / 30, 30 / 30)
# Upstream's head FFN is 8192 wide on the 1536-wide critic (not the DiT's 8960): a 16/3 ratio.
GAN_FFN_RATIO = 16 / 3
# Upstream appends the time embedding scaled by 10 when concat_time_embeddings is on.
TIME_EMBEDDING_SCALE = 10.0
# Register tokens start at N(0, 0.02^2) as upstream.
REGISTER_INIT_STD = 0.02
# The classifier's input LayerNorm is torch's default (eps 1e-5), as upstream.
CLASSIFIER_NORM_EPS = 1e-5


def default_tap_layers(num_layers: int) -> tuple[int, ...]:
    """Block indices after which the head reads hidden states: `round(L * d) - 1` for the relative
    depths d = 14/30, 22/30, 30/30, clamped to `[0, L-1]`. Gives (13, 21, 29) for L = 30 and
    (18, 28, 39) for L = 40. Rounding is half-up."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return tuple(
        min(num_layers - 1, max(0, math.floor(num_layers * d + 0.5) - 1)) for d in UPSTREAM_TAP_DEPTHS
    )


class RegisterTokens(nn.Module):
    """`num_registers` learned tokens `[n, dim]`, RMS-normalised when read."""

    def __init__(self, num_registers: int, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.register_tokens = nn.Parameter(torch.randn(num_registers, dim) * REGISTER_INIT_STD)
        self.rms_norm = RMSNorm(dim, eps)

    def forward(self) -> torch.Tensor:
        return self.rms_norm(self.register_tokens)


class GanCrossAttention(WanSelfAttention):
    """One query (the register token) attends over the video tokens; q/k RMS-normalised, no RoPE."""

    def forward(self, tokens: torch.Tensor, register: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """tokens `[B, L, dim]`, register `[B, 1, dim]` -> `[B, 1, dim]`."""
        q = self.norm_q(self.q(register)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(tokens)).unflatten(-1, (self.num_heads, -1))
        v = self.v(tokens).unflatten(-1, (self.num_heads, -1))
        return self.o(attention(q, k, v).flatten(-2))


class GanAttentionBlock(nn.Module):
    """`token = reg + CA(norm3(video), reg)`; `out = token + FFN(norm2(token))` (no adaLN modulation)."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        qk_norm: bool = True,
        cross_attn_norm: bool = True,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm3 = LayerNorm32(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.norm2 = LayerNorm32(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim)
        )
        self.cross_attn = GanCrossAttention(dim, num_heads, qk_norm, eps)

    def forward(self, tokens: torch.Tensor, register: torch.Tensor) -> torch.Tensor:
        """tokens `[B, L, dim]` (hidden states of a DiT block), register `[B, 1, dim]` -> `[B, 1, dim]`."""
        token = register + self.cross_attn(self.norm3(tokens), register)
        return token + self.ffn(self.norm2(token))


def add_gan_head(
    wrapper: nn.Module,
    num_class: int = 1,
    concat_time_embeddings: bool = False,
    tap_layers: Sequence[int] | None = None,
    ffn_dim: int | None = None,
) -> nn.Module:
    """Attach the classification branch to a critic `WanDiffusionWrapper` (around a `WanModel`).

    Adds `_register_tokens`, `_gan_ca_blocks.{i}` (one per tap layer) and `_cls_pred_branch`
    (LayerNorm -> Linear(dim) -> SiLU -> Linear(num_class)), plus the plain attributes
    `gan_tap_layers` and `gan_concat_time_embeddings`. New parameters follow the DiT's device/dtype.
    Returns the wrapper.
    """
    model = getattr(wrapper, "model", None)
    if not isinstance(model, WanModel):
        raise TypeError(
            f"the GAN head needs a WanDiffusionWrapper around a bidirectional WanModel, got {type(model).__name__}"
        )
    cfg = model.config
    taps = tuple(int(i) for i in (default_tap_layers(cfg.num_layers) if tap_layers is None else tap_layers))
    if not taps or any(not 0 <= i < cfg.num_layers for i in taps):
        raise ValueError(f"tap_layers {list(taps)} must be non-empty block indices in [0, {cfg.num_layers})")
    if num_class < 1:
        raise ValueError(f"num_class must be >= 1, got {num_class}")
    ffn = ffn_dim if ffn_dim is not None else round(cfg.dim * GAN_FFN_RATIO)
    ref = next(model.parameters())
    time_dim = cfg.dim if concat_time_embeddings else 0
    in_dim = len(taps) * cfg.dim + time_dim
    wrapper._register_tokens = RegisterTokens(len(taps), cfg.dim, cfg.eps).to(ref.device, ref.dtype)
    wrapper._gan_ca_blocks = nn.ModuleList(
        GanAttentionBlock(cfg.dim, ffn, cfg.num_heads, cfg.qk_norm, cfg.cross_attn_norm, cfg.eps)
        for _ in taps
    ).to(ref.device, ref.dtype)
    wrapper._cls_pred_branch = nn.Sequential(
        LayerNorm32(in_dim, CLASSIFIER_NORM_EPS, elementwise_affine=True),
        nn.Linear(in_dim, cfg.dim),
        nn.SiLU(),
        nn.Linear(cfg.dim, num_class),
    ).to(ref.device, ref.dtype)
    wrapper.gan_tap_layers = taps
    wrapper.gan_concat_time_embeddings = bool(concat_time_embeddings)
    return wrapper


GAN_HEAD_MODULES = ("_register_tokens", "_gan_ca_blocks", "_cls_pred_branch")


def gan_head_parameter_names(wrapper: nn.Module) -> set[str]:
    """Names (in `wrapper.named_parameters()`) of the classification branch's parameters."""
    return {n for n, _ in wrapper.named_parameters() if n.split(".", 1)[0] in GAN_HEAD_MODULES}


def has_gan_head(wrapper: nn.Module) -> bool:
    return all(hasattr(wrapper, n) for n in GAN_HEAD_MODULES)


def gan_logits(
    wrapper: nn.Module, noisy: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor
) -> torch.Tensor:
    """Discriminator logits of a critic with an attached head: `[B, num_class]`.

    Goes through `wrapper.forward(..., classify=True)` so that FSDP's hooks on the wrapper (which
    owns the head's parameters) gather them as for any other forward.
    """
    return wrapper(noisy, timestep, context, classify=True)


def classify_forward(
    wrapper: nn.Module, noisy: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor
) -> torch.Tensor:
    """Body of the discriminator forward (called from `WanDiffusionWrapper.forward`).

    Args:
        noisy: `[B, F, C, H, W]` noisy latents.
        timestep: `[B]` (one per sample) on the 0..1000 scale.
        context: text embeddings `[B, L, text_dim]`.
    Returns:
        `[B, num_class]` logits.
    """
    if not has_gan_head(wrapper):
        raise ValueError("this critic has no GAN head; call wan.gan_head.add_gan_head(critic, ...) first")
    model: WanModel = wrapper.model
    taps = wrapper.gan_tap_layers
    unique = tuple(sorted(set(taps)))
    time_embedding: list[torch.Tensor] = []
    hook = None
    if wrapper.gan_concat_time_embeddings:
        # Capture e = time_embedding(sinusoid(t)) inside the DiT's own forward (so sharded parameters
        # are gathered as usual): [B, 1, dim] for one timestep per sample.
        hook = model.time_embedding.register_forward_hook(lambda _m, _i, out: time_embedding.append(out))
    try:
        _, hidden = model(noisy.transpose(1, 2), timestep, context, hidden_states_at=unique)
    finally:
        if hook is not None:
            hook.remove()
    by_block = dict(zip(unique, hidden, strict=True))
    registers = wrapper._register_tokens()  # [n, dim]
    b = noisy.shape[0]
    feats = [
        block(by_block[tap], registers[k].expand(b, 1, -1).to(by_block[tap].dtype))
        for k, (tap, block) in enumerate(zip(taps, wrapper._gan_ca_blocks, strict=True))
    ]
    if time_embedding:
        feats.append(TIME_EMBEDDING_SCALE * time_embedding[0].reshape(b, 1, -1).to(feats[0].dtype))
    return wrapper._cls_pred_branch(torch.cat(feats, dim=1).flatten(1))
