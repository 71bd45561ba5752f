"""The shapes world's codec: pixel-unshuffle by 4, behind the Wan VAE's interface (`wan.vae.WanVAE`).

16x16 RGB frames become 48 x 4 x 4 latents, one latent frame per pixel frame (no temporal
compression), losslessly: `decode(encode(v)) == v`. Every pipeline, script and `inference.py` that
takes a VAE takes this codec unchanged (encode, decode, streaming decode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FACTOR = 4


class WorldCodec(nn.Module):
    """Pixels `[B, 3, T, H, W]` in [-1, 1] <-> latents `[B, T, 3*16, H/4, W/4]` (no parameters)."""

    z_dim = 3 * FACTOR * FACTOR
    temporal_compression = 1
    spatial_compression = FACTOR

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # carries device and dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @torch.no_grad()
    def encode(self, videos: Tensor) -> Tensor:
        """Pixels `[B, 3, T, H, W]` -> latents `[B, T, 48, H/4, W/4]` (videos' dtype)."""
        if videos.ndim != 5 or videos.shape[1] != 3 or videos.shape[3] % FACTOR or videos.shape[4] % FACTOR:
            raise ValueError(
                f"WorldCodec.encode: videos must be [B, 3, T, H, W] with H, W divisible by {FACTOR}; "
                f"got {tuple(videos.shape)}"
            )
        frames = videos.transpose(1, 2)  # [B, T, 3, H, W]
        return F.pixel_unshuffle(frames, FACTOR)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents `[B, F, 48, h, w]` -> pixels `[B, F, 3, 4h, 4w]` clamped to [-1, 1]."""
        if latents.ndim != 5 or latents.shape[2] != self.z_dim:
            raise ValueError(
                f"WorldCodec.decode: latents must be [B, F, {self.z_dim}, h, w], got {tuple(latents.shape)}"
            )
        return F.pixel_shuffle(latents, FACTOR).clamp(-1.0, 1.0)

    def stream_decoder(self) -> WorldStreamingDecoder:
        return WorldStreamingDecoder(self)


class WorldStreamingDecoder:
    """Chunk-by-chunk decoding (frame-local, so trivially equal to one full decode)."""

    def __init__(self, codec: WorldCodec) -> None:
        self.codec = codec
        self.reset()

    def reset(self) -> None:
        self.frames_decoded = 0

    def decode(self, latent_chunk: Tensor) -> Tensor:
        self.frames_decoded += latent_chunk.shape[1]
        return self.codec.decode(latent_chunk)
