"""Block-causal Wan2.1 DiT (the Self-Forcing generator), spec §2.

Two paths share the same parameters (and the official key names):

* training path (no KV cache): all frames at once with a block-causal attention mask, optionally in
  the teacher-forcing layout `[clean | noisy]`;
* inference path (KV cache): one block of frames at a time, starting at an absolute frame index.

Both compute the same function: a test checks cached block-by-block inference against one
training-path forward.
"""

from __future__ import annotations

import torch

from .cache import CrossAttentionCache, KVCache
from .config import WanConfig
from .masks import MaskCache, block_causal_frame_mask, teacher_forcing_frame_mask, use_flex_for
from .modules import Rope, WanBackbone, frame_timesteps


class CausalWanModel(WanBackbone):
    """
    Args:
        cfg: network sizes.
        num_frame_per_block: latent frames generated together (bidirectional inside a block).
        local_attn_size: attention window in latent frames (-1: attend to everything before).
        sink_size: frames at the start of the video that stay inside every window.
        independent_first_frame: chunk layout `[1, N, N, ...]` (image-to-video).
        attn_backend: block-mask kernel: "auto" (flex on CUDA, block-sparse SDPA elsewhere), "flex", "sdpa".
    """

    def __init__(
        self,
        cfg: WanConfig,
        num_frame_per_block: int = 1,
        local_attn_size: int = -1,
        sink_size: int = 0,
        independent_first_frame: bool = False,
        attn_backend: str = "auto",
    ) -> None:
        super().__init__(cfg)
        if local_attn_size != -1 and local_attn_size - sink_size < num_frame_per_block:
            raise ValueError(
                f"local_attn_size - sink_size = {local_attn_size - sink_size} frames cannot hold a block of "
                f"num_frame_per_block={num_frame_per_block} frames"
            )
        if attn_backend not in ("auto", "flex", "sdpa"):
            raise ValueError(f"attn_backend must be auto, flex or sdpa, got {attn_backend!r}")
        self.num_frame_per_block = num_frame_per_block
        self.local_attn_size = local_attn_size
        self.sink_size = sink_size
        self.independent_first_frame = independent_first_frame
        self.attn_backend = attn_backend
        self._masks = MaskCache()

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        *,
        kv_cache: KVCache | None = None,
        crossattn_cache: CrossAttentionCache | None = None,
        current_start_frame: int = 0,
        clean_x: torch.Tensor | None = None,
        aug_t: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x: latents `[B, C, F, H, W]` (all frames, or one block when `kv_cache` is given).
            t: timesteps `[B, F]` per latent frame (or `[B]`), 0..1000 scale.
            context: text embeddings `[B, L, text_dim]`, L <= text_len.
            kv_cache / crossattn_cache: select the inference path (block by block).
            current_start_frame: absolute index of x's first latent frame (inference path).
            clean_x: clean latents `[B, C, F, H, W]` for teacher forcing (training path only).
            aug_t: timesteps of the clean half, `[B, F]` or `[B]` (default 0).
        Returns:
            flow prediction `[B, C, F, H, W]` for x.
        """
        if kv_cache is not None:
            if clean_x is not None:
                raise ValueError("teacher forcing (clean_x) is a training-path feature; do not pass kv_cache")
            return self._forward_inference(x, t, context, kv_cache, crossattn_cache, current_start_frame)
        return self._forward_train(x, t, context, clean_x, aug_t)

    # ------------------------------------------------------------------ training path
    def _forward_train(self, x, t, context, clean_x, aug_t) -> torch.Tensor:
        b, _, f, _, _ = x.shape
        # 1. embeddings
        tokens, grid = self.embed_video(x)
        frames, tpf = grid[0], grid[1] * grid[2]
        t_frames = frame_timesteps(torch.as_tensor(t, device=x.device), b, f)
        t = t_frames[:, :: self.config.patch_size[0]]
        rope = Rope.for_grid(self.config, grid, 0, x.device, tokens.dtype)
        use_flex = use_flex_for(x.device, self.attn_backend)
        window = (self.local_attn_size, self.sink_size)
        if clean_x is None:
            key = ("causal", frames, self.num_frame_per_block, self.independent_first_frame, *window)
            mask = self._masks.get(
                key,
                lambda: block_causal_frame_mask(
                    frames, self.num_frame_per_block, self.independent_first_frame, *window
                ),
                tpf,
                x.device,
                use_flex,
            )
        else:
            if self.independent_first_frame:
                raise ValueError("teacher forcing is not supported together with independent_first_frame")
            clean_tokens, _ = self.embed_video(clean_x)
            tokens = torch.cat([clean_tokens, tokens], dim=1)
            aug = (
                torch.zeros_like(t)
                if aug_t is None
                else frame_timesteps(torch.as_tensor(aug_t, device=x.device), b, frames)
            )
            t = torch.cat([aug.to(t.dtype), t], dim=1)
            rope = rope.repeat(2)
            key = ("teacher_forcing", frames, self.num_frame_per_block, *window)
            mask = self._masks.get(
                key,
                lambda: teacher_forcing_frame_mask(frames, self.num_frame_per_block, *window),
                tpf,
                x.device,
                use_flex,
            )
        e, e0 = self.embed_time(t, context)
        text = self.embed_text(context)
        shards = self.token_shards(tokens.shape[1] // tpf, tpf)  # None without sequence parallelism
        if shards is not None:
            tokens = shards.shard(tokens)
        # 2. blocks
        for i in range(len(self.blocks)):
            tokens = self.run_block(i, tokens, e0, text, rope, mask=mask, shards=shards)
        # 3. head on the noisy half only
        if clean_x is not None:
            local_tpf = tpf if shards is None else shards.local_tokens_per_frame
            tokens, e = tokens[:, frames * local_tpf :], e[:, frames:]
        out = self.head(tokens, e)
        if shards is not None:  # every rank gets the prediction for every token of the `frames` frames
            out = self.token_shards(frames, tpf).gather(out)
        return self.as_flow(self.unpatchify(out, grid), x, t_frames)

    # ------------------------------------------------------------------ inference path
    def _forward_inference(self, x, t, context, kv_cache, crossattn_cache, start_frame: int) -> torch.Tensor:
        b, _, f, _, _ = x.shape
        tokens, grid = self.embed_video(x, start_frame=start_frame)
        frames = grid[0]
        if kv_cache.tokens_per_frame != grid[1] * grid[2]:
            raise ValueError(
                f"KV cache was sized for {kv_cache.tokens_per_frame} tokens per frame, input has {grid[1] * grid[2]}"
            )
        heads = self.config.num_heads // (self.sequence_parallel.size if self.sequence_parallel else 1)
        if kv_cache.num_heads != heads:
            raise ValueError(
                f"KV cache holds {kv_cache.num_heads} heads, this model attends with {heads} per rank "
                "(allocate it with KVCache.for_model after enable_sequence_parallel)"
            )
        t_frames = frame_timesteps(torch.as_tensor(t, device=x.device), b, f)
        t = t_frames[:, :: self.config.patch_size[0]]
        e, e0 = self.embed_time(t, context)
        rope = Rope.for_grid(self.config, grid, start_frame, x.device, tokens.dtype)
        shards = self.token_shards(frames, grid[1] * grid[2])  # None without sequence parallelism
        if shards is not None:
            tokens = shards.shard(tokens)
        # Text K/V: reuse the cache in no-grad calls; differentiable calls recompute so that gradients
        # reach the text path (text_embedding and the cross-attention k/v projections).
        grad = torch.is_grad_enabled()
        use_xcache = crossattn_cache is not None and not grad
        text = None if (use_xcache and crossattn_cache.is_init) else self.embed_text(context)
        for i in range(len(self.blocks)):
            text_i = crossattn_cache.slot(i, text) if use_xcache else text
            hook = kv_cache.layers[i].hook(start_frame, frames)
            tokens = self.run_block(i, tokens, e0, text_i, rope, kv_hook=hook, shards=shards)
        out = self.head(tokens, e)
        if shards is not None:
            out = shards.gather(out)
        return self.as_flow(self.unpatchify(out, grid), x, t_frames)
