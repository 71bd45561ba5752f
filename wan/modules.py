"""Building blocks of the Wan2.1 DiT (spec §1.2-§1.5), shared by the bidirectional and causal models.

Parameter names match the official Wan2.1 checkpoints exactly (spec §1.7).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .config import WanConfig
from .sequence_parallel import SequenceComm, TokenShards, check_heads

# Wan's RoPE base (spec §1.4).
ROPE_THETA = 10000.0
# WanConfig.predict_x0: the smallest sigma the flow (x - x0) / sigma divides by.
PREDICT_X0_MIN_SIGMA = 1e-3

# A hook that turns this call's (roped) keys/values `[B, L, H, D]` into the keys/values to attend to
# (the causal model's KV cache). None means: attend to this call's own tokens.
KVHook = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class RMSNorm(nn.Module):
    """RMSNorm over the full feature dim, computed in float32 (spec §1.4)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (Wan runs all its norms in fp32).

    The affine parameters are upcast too, so it works when FSDP mixed precision or `.to(bf16)`
    made them bf16.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """`[N] -> [N, dim]` with `[cos(t*w), sin(t*w)]`, w_i = 10000^(-i/(dim/2)), computed in float64."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.to(torch.float64)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def rope_angles(
    cfg: WanConfig,
    frames: int,
    height: int,
    width: int,
    start_frame: int,
    device,
    theta: float | None = None,
) -> torch.Tensor:
    """RoPE angles `[frames*height*width, head_dim/2]` (float64) for a token grid (spec §1.4).

    Channel pairs (2i, 2i+1) are rotated together; the head_dim/2 pairs are split between time,
    height and width as `rope_dims/2`, axis frequencies `theta^(-2i/axis_dim)`. Time positions start at
    `start_frame` (absolute frame index of the first frame), height/width at 0. Angles are computed
    directly, so there is no table limit.
    """
    base = cfg.rope_theta if theta is None else theta  # WanConfig.rope_theta: 10000 for Wan2.1
    angles = []
    for axis_dim, n, offset in zip(cfg.rope_dims, (frames, height, width), (start_frame, 0, 0), strict=True):
        freqs = torch.pow(base, -torch.arange(0, axis_dim, 2, dtype=torch.float64, device=device) / axis_dim)
        pos = torch.arange(offset, offset + n, dtype=torch.float64, device=device)
        angles.append(pos[:, None] * freqs[None, :])
    t, h, w = angles
    grid = torch.cat(
        [
            t[:, None, None, :].expand(frames, height, width, -1),
            h[None, :, None, :].expand(frames, height, width, -1),
            w[None, None, :, :].expand(frames, height, width, -1),
        ],
        dim=-1,
    )
    return grid.reshape(frames * height * width, -1)


class _RopeTables:
    """The rotation factors `exp(i * angles)` of the last few token grids, keyed by every input.

    A rollout calls the DiT K+1 times per block with the same grid and start frame, and the training
    path once per step with the same grid: the float64 angles and their cos/sin are computed once per
    key instead of on every call. Entries are constants (never part of an autograd graph).
    """

    def __init__(self, max_entries: int = 64) -> None:
        self._entries: dict[tuple, torch.Tensor] = {}
        self._max = max_entries

    def get(
        self, cfg: WanConfig, grid: tuple[int, int, int], start_frame: int, device, dtype, theta: float
    ) -> torch.Tensor:
        # float64 activations keep float64 factors (reference runs); everything else rotates in fp32.
        table_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        key = (cfg.rope_dims, tuple(grid), int(start_frame), torch.device(device), table_dtype, float(theta))
        table = self._entries.get(key)
        if table is None:
            # Built outside any inference_mode so that grad-enabled calls may save it for backward.
            with torch.inference_mode(False), torch.no_grad():
                angles = rope_angles(cfg, *grid, start_frame=start_frame, device=device, theta=theta)
                table = torch.polar(torch.ones_like(angles), angles).to(table_dtype)[:, None, :]
            if len(self._entries) >= self._max:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = table
        return table

    def clear(self) -> None:
        self._entries.clear()


ROPE_TABLES = _RopeTables()


class Rope:
    """RoPE for a token grid: rotates channel pairs of `[B, L, H, D]` tensors by `[L, 1, D/2]` angles.

    The factors `cos + i sin` are computed from float64 angles once per (grid, start frame, dtype,
    device, theta) and stored as complex64; the rotation is one complex multiply in fp32 (complex128
    for float64 inputs). The reference implementation rotated in float64 on every call; the fp32
    rotation stays within 1e-5 of it (tests/test_rope.py) and is an order of magnitude cheaper.
    """

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    @classmethod
    def for_grid(
        cls,
        cfg: WanConfig,
        grid: tuple[int, int, int],
        start_frame: int,
        device,
        dtype: torch.dtype,
        theta: float | None = None,
    ) -> Rope:
        """RoPE of a `(frames, height, width)` token grid whose first frame is `start_frame`."""
        theta = cfg.rope_theta if theta is None else theta
        return cls(ROPE_TABLES.get(cfg, grid, start_frame, device, dtype, theta))

    def repeat(self, times: int) -> Rope:
        """The same positions for `times` consecutive copies of the sequence (teacher forcing)."""
        return Rope(self.table.repeat(times, 1, 1))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, L, H, D]` -> the same, each channel pair (2i, 2i+1) rotated as the complex number x_2i + i x_2i+1."""
        real = torch.float64 if self.table.dtype == torch.complex128 else torch.float32
        xc = torch.view_as_complex(x.to(real).unflatten(-1, (-1, 2)).contiguous())
        return torch.view_as_real(xc * self.table).flatten(-2).to(x.dtype)


class WanSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope,
        mask=None,
        kv_hook: KVHook | None = None,
        shards: TokenShards | None = None,
    ) -> torch.Tensor:
        """x: `[B, L, dim]` -> `[B, L, dim]` (with `shards`, L is this rank's token shard)."""
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1))
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        if shards is not None:  # Ulysses: token shard, all heads -> whole sequence, this rank's heads
            q, k, v = shards.to_heads(q, k, v)
        # RoPE, the KV cache and the mask see whole-sequence positions either way.
        q, k = rope.apply(q), rope.apply(k)
        if kv_hook is not None:
            k, v = kv_hook(k, v)
        out = attention(q, k, v, mask)
        if shards is not None:
            out = shards.to_tokens(out)
        return self.o(out.flatten(-2))


class WanCrossAttention(WanSelfAttention):
    """Text cross-attention: queries from video tokens, keys/values from the embedded text; no RoPE."""

    def text_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context `[B, Lt, dim]` -> k, v `[B, Lt, H, D]` (cacheable per video)."""
        k = self.norm_k(self.k(context)).unflatten(-1, (self.num_heads, -1))
        v = self.v(context).unflatten(-1, (self.num_heads, -1))
        return k, v

    def forward(self, x: torch.Tensor, text_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        k, v = text_kv
        return self.o(attention(q, k, v).flatten(-2))


class WanAttentionBlock(nn.Module):
    """One DiT block with 6-way adaLN modulation (spec §1.3)."""

    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm32(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = (
            LayerNorm32(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        )
        self.cross_attn = WanCrossAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = LayerNorm32(dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        text_kv: tuple[torch.Tensor, torch.Tensor] | torch.Tensor,
        rope: Rope,
        mask=None,
        kv_hook: KVHook | None = None,
        shards: TokenShards | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x: `[B, L, dim]` tokens, frame-major; L must be a multiple of the number of modulation frames.
            e0: `[B, Fm, 6, dim]` per-frame modulation (Fm = 1 broadcasts over all tokens).
            text_kv: the embedded context `[B, Lt, dim]` to project here, its keys/values, or a
                `TextKVSlot` of a cross-attention cache (read, or filled on first use).
            shards: sequence parallelism: x is this rank's shard (`wan.sequence_parallel`); only
                self-attention communicates, everything else here is token-local.
        """
        b, length, dim = x.shape
        fm = e0.shape[1]
        mod = (self.modulation.float()[:, None] + e0.float()).chunk(6, dim=2)  # each [B, Fm, 1, dim]

        def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            hv = h.float().view(b, fm, length // fm, dim)
            return (hv * (1 + scale) + shift).view(b, length, dim).type_as(h)

        def gated(res: torch.Tensor, h: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
            hv = h.float().view(b, fm, length // fm, dim) * gate
            return (res.float() + hv.view(b, length, dim)).type_as(res)

        # 1. self-attention with shift/scale/gate a0/a1/a2
        h = self.self_attn(
            modulate(self.norm1(x), mod[0], mod[1]), rope, mask=mask, kv_hook=kv_hook, shards=shards
        )
        x = gated(x, h, mod[2])
        # 2. cross-attention (no modulation, no gate); K/V computed here, where FSDP gathered the weights
        if isinstance(text_kv, torch.Tensor):
            text_kv = self.cross_attn.text_kv(text_kv)
        elif not isinstance(text_kv, tuple):  # a cross-attention cache slot
            text_kv = text_kv.get(self.cross_attn.text_kv)
        x = x + self.cross_attn(self.norm3(x), text_kv)
        # 3. feed-forward with shift/scale/gate a3/a4/a5
        h = self.ffn(modulate(self.norm2(x), mod[3], mod[4]))
        return gated(x, h, mod[5])


class Head(nn.Module):
    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        out = math.prod(cfg.patch_size) * cfg.out_dim
        self.norm = LayerNorm32(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, out)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x `[B, L, dim]`, e `[B, Fm, dim]` per-frame time embedding -> `[B, L, prod(patch)*out_dim]`."""
        b, length, dim = x.shape
        fm = e.shape[1]
        # shift, scale: [B, Fm, 1, dim], broadcast over the tokens of their frame
        shift, scale = (self.modulation.float()[:, None] + e.float()[:, :, None]).chunk(2, dim=2)
        h = self.norm(x).float().view(b, fm, length // fm, dim)
        h = (h * (1 + scale) + shift).view(b, length, dim)
        return self.head(h.type_as(x))


def sincos_features(num_positions: int, dim: int, table_size: int | None = None) -> torch.Tensor:
    """Fixed features `[num_positions, dim]` of integer positions 0..n-1: `[sin(2 pi p / T_i), cos(...)]`
    for dim/2 periods T_i spaced geometrically from 3 to 4m (m = `table_size`, default n): the shortest
    tells neighbours apart (a period of 2 would make its sine vanish at every integer), the longest
    never wraps over the table's m positions (computed in float64)."""
    if dim % 2:
        raise ValueError(f"sincos_features: dim must be even, got {dim}")
    half = dim // 2
    span = num_positions if table_size is None else table_size
    periods = torch.logspace(math.log10(3.0), math.log10(4.0 * span), half, dtype=torch.float64)
    angles = torch.arange(num_positions, dtype=torch.float64)[:, None] * (2 * math.pi / periods)[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_axis_dims(dim: int) -> tuple[int, int, int]:
    """How `sincos` position features split `dim` between (frame, height, width): even parts, a third
    for frames (rounded down to even), the rest halved between rows and columns."""
    frame = (dim // 3) // 2 * 2
    height = (dim - frame) // 4 * 2
    return frame, height, dim - frame - height


class PositionEmbedding(nn.Module):
    """Absolute position embedding `frame[f] + height[h] + width[w]` (see WanConfig.pos_embed_*).

    `learned`: three trained tables. `sincos`: fixed features, the frame / height / width features
    side by side in disjoint channels (zero elsewhere), so the sum is their concatenation.
    Frame rows are clamped: frame f >= pos_embed_frames - 1 uses the last row. Training on clips longer
    than the table therefore trains the last row at every later position, and a rollout past the
    training length sees nothing new; relative order comes from RoPE. `sincos` with
    `pos_embed_extrapolate` gives every frame its own row instead; without `pos_embed_frame_rows` there
    are no frame rows at all (RoPE alone tells frames apart).
    """

    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        gh, gw = cfg.pos_embed_grid
        self.kind = cfg.pos_embed_type
        self.extrapolate = cfg.pos_embed_extrapolate
        self.frame_rows = cfg.pos_embed_frame_rows
        if self.kind == "learned":
            if self.frame_rows:  # no parameter that would never train
                self.frame = nn.Parameter(torch.zeros(cfg.pos_embed_frames, cfg.dim))
            self.height = nn.Parameter(torch.zeros(gh, cfg.dim))
            self.width = nn.Parameter(torch.zeros(gw, cfg.dim))
        else:  # constants: buffers outside the state dict (a pure function of the config)
            self._sizes = (cfg.pos_embed_frames, gh, gw, cfg.dim)
            for name, table in zip(("frame", "height", "width"), self._sincos_tables(), strict=True):
                self.register_buffer(name, table, persistent=False)

    def _sincos_tables(self, device=None) -> list[torch.Tensor]:
        frames, gh, gw, dim = self._sizes
        df, dh, dw = sincos_axis_dims(dim)
        tables = []
        for n, d, offset in ((frames, df, 0), (gh, dh, df), (gw, dw, df + dh)):
            table = torch.zeros(n, dim)
            table[:, offset : offset + d] = sincos_features(n, d)
            tables.append(table.to(device))
        return tables

    def init_non_persistent_buffers(self) -> None:
        """Recompute the fixed tables after a meta-device build (`utils.distributed`)."""
        if self.kind == "sincos":
            with torch.no_grad():
                for name, table in zip(("frame", "height", "width"), self._sincos_tables(), strict=True):
                    getattr(self, name).copy_(table)

    def _frame_rows(self, start_frame: int, num_frames: int) -> torch.Tensor:
        """`[num_frames, dim]` rows of frames `start_frame, ...`: clamped at the table's last row, or with
        `extrapolate` the sin/cos features of every frame (periods fixed by the table's size)."""
        table, stop = self.frame, start_frame + num_frames
        if self.extrapolate and stop > table.shape[0]:
            frames, _, _, dim = self._sizes
            df = sincos_axis_dims(dim)[0]
            table = torch.zeros(stop, dim, device=table.device, dtype=table.dtype)
            table[:, :df] = sincos_features(stop, df, table_size=frames).to(table)
        rows = torch.arange(start_frame, stop, device=table.device).clamp(max=table.shape[0] - 1)
        return table[rows]

    def forward(self, grid: tuple[int, int, int], start_frame: int) -> torch.Tensor:
        """`[F*H*W, dim]` for a token grid (F, H, W) whose first frame has absolute index `start_frame`."""
        f, h, w = grid
        if h != self.height.shape[0] or w != self.width.shape[0]:
            raise ValueError(
                f"position embedding was built for a {self.height.shape[0]}x{self.width.shape[0]} token grid, "
                f"input has {h}x{w}"
            )
        if self.frame_rows:
            frame = self._frame_rows(start_frame, f)
            emb = frame[:, None, None] + self.height[None, :, None] + self.width[None, None, :]
        else:
            emb = (self.height[:, None] + self.width[None, :]).expand(f, h, w, -1)
        return emb.reshape(f * h * w, -1)


class WanBackbone(nn.Module):
    """Embeddings, blocks and head shared by `WanModel` and `CausalWanModel` (no attention policy here)."""

    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        self.config = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        # The pooled prompt, added to the time embedding (WanConfig.text_time_embedding).
        self.text_time_embedding = (
            nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
            if cfg.text_time_embedding
            else None
        )
        self.blocks = nn.ModuleList([WanAttentionBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.pos_embedding = PositionEmbedding(cfg) if cfg.pos_embed_frames > 0 else None
        self.gradient_checkpointing = False
        self.gradient_checkpointing_offload = False
        self.sequence_parallel: SequenceComm | None = None
        self.init_weights()

    # -- initialisation (spec §1.6; only matters when training from scratch or in tests) --
    @torch.no_grad()
    def init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        cfg = self.config
        if self.pos_embedding is not None:
            for table in self.pos_embedding.parameters():
                nn.init.normal_(table, std=0.02)
        if self.text_time_embedding is not None:  # starts as a no-op: the time embedding alone
            nn.init.normal_(self.text_time_embedding[0].weight, std=0.02)
            nn.init.zeros_(self.text_time_embedding[2].weight)
        for block in self.blocks:
            for norm in (block.self_attn.norm_q, block.self_attn.norm_k):
                if isinstance(norm, RMSNorm):
                    norm.weight.fill_(cfg.qk_norm_init)
            if cfg.zero_init_gates:  # chunks 2 and 5 of the 6-way modulation are the residual gates
                block.modulation[:, 2].zero_()
                block.modulation[:, 5].zero_()
        if cfg.zero_init_gates:
            proj = self.time_projection[1]
            for chunk in (2, 5):
                proj.weight[chunk * cfg.dim : (chunk + 1) * cfg.dim].zero_()
                proj.bias[chunk * cfg.dim : (chunk + 1) * cfg.dim].zero_()

    def enable_gradient_checkpointing(self, enabled: bool = True, offload: bool = False) -> None:
        """Recompute each block in backward; with `offload`, the inputs a checkpointed block keeps for
        backward wait in (pinned) CPU memory instead (DiffSynth's gradient_checkpointing_offload)."""
        self.gradient_checkpointing = enabled
        self.gradient_checkpointing_offload = enabled and offload

    def enable_sequence_parallel(self, comm: SequenceComm | None) -> None:
        """Split every forward's video tokens over `comm`'s ranks (Ulysses, `wan.sequence_parallel`);
        None turns it off. The ranks of the group must call the model together, with the same inputs."""
        if comm is not None:
            check_heads(self.config.num_heads, comm.size)
        self.sequence_parallel = comm if comm is not None and comm.size > 1 else None

    def token_shards(self, frames: int, tokens_per_frame: int) -> TokenShards | None:
        """This forward's token split over the sequence-parallel group, or None without one."""
        if self.sequence_parallel is None:
            return None
        return TokenShards(self.sequence_parallel, frames, tokens_per_frame)

    # -- pieces used by both models --
    def embed_video(self, x: torch.Tensor, start_frame: int = 0) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """x `[B, C, F, H, W]` -> tokens `[B, F'*H'*W', dim]` (frame-major) and the grid (F', H', W').

        `start_frame` is the absolute index of x's first token frame (used by the optional learned
        position embedding; RoPE positions are applied in attention)."""
        h = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))
        grid = tuple(h.shape[2:])
        tokens = h.flatten(2).transpose(1, 2)
        if self.pos_embedding is not None:
            tokens = tokens + self.pos_embedding(grid, start_frame).to(tokens.dtype)
        return tokens.contiguous(), grid  # type: ignore[return-value]

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """context `[B, L, text_dim]` with L <= text_len, zero-padded to text_len, -> `[B, text_len, dim]`."""
        b, length, _ = context.shape
        text_len = self.config.text_len
        if length > text_len:
            raise ValueError(f"text context has {length} tokens, more than text_len={text_len}")
        if length < text_len:
            context = torch.cat([context, context.new_zeros(b, text_len - length, context.shape[-1])], dim=1)
        return self.text_embedding(context.to(self.text_embedding[0].weight.dtype))

    def embed_time(
        self, t: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """t `[B, Fm]` -> e `[B, Fm, dim]` (head) and e0 `[B, Fm, 6, dim]` (blocks).

        With `text_time_embedding`, `context` `[B, L, text_dim]` (L <= text_len) is pooled (its sum
        over the rows divided by text_len, so zero padding changes nothing) and its embedding added to e.
        """
        b, fm = t.shape
        dtype = self.time_embedding[0].weight.dtype
        s = sinusoidal_embedding(t.flatten(), self.config.freq_dim).to(dtype)
        e = self.time_embedding(s).view(b, fm, -1)
        if self.text_time_embedding is not None:
            if context is None:
                raise ValueError("text_time_embedding needs the text context in embed_time")
            pooled = context.to(dtype).sum(dim=1) / self.config.text_len  # [B, text_dim]
            e = e + self.text_time_embedding(pooled)[:, None]
        e0 = self.time_projection(e).unflatten(-1, (6, self.config.dim))
        return e, e0

    def run_block(self, i: int, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        block = self.blocks[i]
        if self.gradient_checkpointing and torch.is_grad_enabled():
            offload = (
                torch.autograd.graph.save_on_cpu(pin_memory=x.is_cuda)
                if self.gradient_checkpointing_offload
                else contextlib.nullcontext()
            )
            with offload:
                return torch.utils.checkpoint.checkpoint(block, x, *args, use_reentrant=False, **kwargs)
        return block(x, *args, **kwargs)

    def as_flow(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The head's unpatchified output `out` `[B, C, F, H, W]` as a flow prediction for the input `x`
        at per-frame timesteps `t` `[B, F]`: itself, or with `predict_x0` `(x - out) / sigma` in float32
        (sigma = t / 1000, floored at PREDICT_X0_MIN_SIGMA so a clean pass at t = 0 stays finite: the
        wrapper's `x0 = x - sigma * flow` then gives back `out` for every t above the floor)."""
        if not self.config.predict_x0:
            return out
        sigma = (t.float() / 1000.0).clamp(min=PREDICT_X0_MIN_SIGMA)[:, None, :, None, None]
        return ((x.float() - out.float()) / sigma).to(out.dtype)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """`[B, F'*H'*W', prod(patch)*C]` -> `[B, C, F'*pt, H'*ph, W'*pw]` (channels fastest in a patch)."""
        b = x.shape[0]
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        x = x.view(b, f, h, w, pt, ph, pw, self.config.out_dim)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, self.config.out_dim, f * pt, h * ph, w * pw)


def frame_timesteps(t: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """Normalise timesteps `[B]` / `[B, F]` / scalar to `[B, F]`."""
    t = torch.as_tensor(t)
    if t.dim() == 0:
        t = t.expand(batch)
    if t.dim() == 1:
        if t.shape[0] != batch:
            raise ValueError(f"timestep has batch {t.shape[0]}, latents have {batch}")
        return t[:, None].expand(batch, frames)
    if t.shape != (batch, frames):
        raise ValueError(f"per-frame timesteps must be [B, F]=({batch}, {frames}), got {tuple(t.shape)}")
    return t


__all__ = [
    "ROPE_TABLES",
    "ROPE_THETA",
    "Head",
    "KVHook",
    "LayerNorm32",
    "PositionEmbedding",
    "RMSNorm",
    "Rope",
    "WanAttentionBlock",
    "WanBackbone",
    "WanCrossAttention",
    "WanSelfAttention",
    "frame_timesteps",
    "rope_angles",
    "sinusoidal_embedding",
]
