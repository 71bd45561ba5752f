"""Bidirectional Wan2.1 DiT (the teacher / critic), spec §1.2."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import WanConfig
from .modules import Rope, WanBackbone, frame_timesteps


class WanModel(WanBackbone):
    """Wan2.1 text-to-video DiT with full (bidirectional) attention over all tokens.

    Parameter names are those of the official checkpoints, so `load_state_dict` of an official state
    dict works as is.
    """

    def __init__(self, cfg: WanConfig) -> None:
        super().__init__(cfg)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        hidden_states_at: Sequence[int] = (),
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """
        Args:
            x: latents `[B, C, F, H, W]`.
            t: timesteps on the 0..1000 scale, `[B]` (one per sample) or `[B, F]` (one per latent frame).
            context: text embeddings `[B, L, text_dim]`, L <= text_len (zero-padded here).
            hidden_states_at: block indices after which to also return the hidden tokens `[B, L, dim]`
                (all L tokens, also under sequence parallelism).
        Returns:
            flow prediction `[B, C, F, H, W]` (and the requested hidden states).
        """
        b, _, f, _, _ = x.shape
        # 1. embeddings
        tokens, grid = self.embed_video(x)
        t = torch.as_tensor(t, device=x.device)
        t_frames = frame_timesteps(t, b, f)
        t = t[:, None] if t.dim() == 1 else t_frames[:, :: self.config.patch_size[0]]
        e, e0 = self.embed_time(t, context)
        text = self.embed_text(context)
        rope = Rope.for_grid(self.config, grid, 0, x.device, tokens.dtype)
        shards = self.token_shards(grid[0], grid[1] * grid[2])  # None without sequence parallelism
        if shards is not None:
            tokens = shards.shard(tokens)
        # 2. blocks
        hidden = []
        for i in range(len(self.blocks)):
            tokens = self.run_block(i, tokens, e0, text, rope, shards=shards)
            if i in hidden_states_at:
                hidden.append(tokens if shards is None else shards.gather(tokens))
        # 3. head and unpatchify
        out = self.head(tokens, e)
        if shards is not None:
            out = shards.gather(out)
        out = self.as_flow(self.unpatchify(out, grid), x, t_frames)
        return (out, hidden) if hidden_states_at else out
