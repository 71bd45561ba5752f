"""Frozen Wan2.1 causal video VAE (spec §1.9) on top of diffusers' ``AutoencoderKLWan``.

* ``encode``: pixels ``[B, 3, T, H, W]`` in [-1, 1] (``T = 1 + 4k``) -> normalised posterior means
  ``[B, F, C, h, w]`` with ``F = 1 + (T - 1) / 4``; normalisation ``z = (mu - mean_c) / std_c`` per
  channel with the mean/std stored in the diffusers config (Wan's 16 fixed values for the real VAE).
* ``decode``: ``[B, F, C, h, w]`` -> pixels ``[B, T, 3, H, W]`` clamped to [-1, 1].
* ``StreamingDecoder``: decodes latent chunks one after another while keeping the decoder's causal
  temporal feature cache, so the concatenated chunks equal one full ``decode``.

Loads a diffusers-format folder (``<root>/vae/``) or Wan's original ``Wan2.1_VAE.pth`` through an
explicit key mapping (inverse provided for round trips).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
from torch import Tensor, nn

from .weights import raise_key_problems

logger = logging.getLogger(__name__)

__all__ = ["StreamingDecoder", "WanVAE", "diffusers_vae_key_to_original", "wan21_vae_config"]


def wan21_vae_config() -> dict[str, Any]:
    """Wan2.1 VAE hyper-parameters (the latent mean/std come from diffusers' defaults for this VAE)."""
    return {
        "base_dim": 96,
        "z_dim": 16,
        "dim_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "attn_scales": [],
        "temperal_downsample": [False, True, True],
    }


# ---------------------------------------------------------------------------------------------- keys

# Inside a residual block, the original ``residual`` Sequential is
# (RMSNorm, SiLU, Conv, RMSNorm, SiLU, Dropout, Conv): parameters sit at indices 0, 2, 3 and 6.
_RESNET_INNER = {
    "norm1.gamma": "residual.0.gamma",
    "conv1.weight": "residual.2.weight",
    "conv1.bias": "residual.2.bias",
    "norm2.gamma": "residual.3.gamma",
    "conv2.weight": "residual.6.weight",
    "conv2.bias": "residual.6.bias",
    "conv_shortcut.weight": "shortcut.weight",
    "conv_shortcut.bias": "shortcut.bias",
}
_TOP_LEVEL = {"quant_conv": "conv1", "post_quant_conv": "conv2"}

_RE_TOP = re.compile(r"^(quant_conv|post_quant_conv)\.(weight|bias)$")
_RE_CONV_IN = re.compile(r"^(encoder|decoder)\.conv_in\.(weight|bias)$")
_RE_NORM_OUT = re.compile(r"^(encoder|decoder)\.norm_out\.gamma$")
_RE_CONV_OUT = re.compile(r"^(encoder|decoder)\.conv_out\.(weight|bias)$")
_RE_MID_RESNET = re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)$")
_RE_MID_ATTN = re.compile(r"^(encoder|decoder)\.mid_block\.attentions\.(\d+)\.(.+)$")
_RE_DOWN = re.compile(r"^encoder\.down_blocks\.(\d+)\.(.+)$")
_RE_UP_RESNET = re.compile(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$")
_RE_UP_SAMPLER = re.compile(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)$")


def diffusers_vae_key_to_original(key: str, num_res_blocks: int) -> str | None:
    """Original Wan VAE name for one ``AutoencoderKLWan`` key (``None`` if it has no counterpart).

    The original decoder keeps every stage in one flat ``upsamples`` list of ``num_res_blocks + 1``
    residual blocks followed by one resampler, hence the index arithmetic; the original middle is
    (resnet, attention, resnet) and the heads are (RMSNorm, SiLU, Conv).
    """
    if m := _RE_TOP.match(key):
        return f"{_TOP_LEVEL[m.group(1)]}.{m.group(2)}"
    if m := _RE_CONV_IN.match(key):
        return f"{m.group(1)}.conv1.{m.group(2)}"
    if m := _RE_NORM_OUT.match(key):
        return f"{m.group(1)}.head.0.gamma"
    if m := _RE_CONV_OUT.match(key):
        return f"{m.group(1)}.head.2.{m.group(2)}"
    if m := _RE_MID_RESNET.match(key):
        inner = _RESNET_INNER.get(m.group(3))
        return None if inner is None else f"{m.group(1)}.middle.{2 * int(m.group(2))}.{inner}"
    if m := _RE_MID_ATTN.match(key):
        return f"{m.group(1)}.middle.{2 * int(m.group(2)) + 1}.{m.group(3)}"
    if m := _RE_DOWN.match(key):
        # The encoder list is flat in both; residual blocks rename their insides, resamplers do not.
        return f"encoder.downsamples.{m.group(1)}.{_RESNET_INNER.get(m.group(2), m.group(2))}"
    stage_len = num_res_blocks + 2  # (num_res_blocks + 1) residual blocks + one resampler
    if m := _RE_UP_RESNET.match(key):
        inner = _RESNET_INNER.get(m.group(3))
        index = int(m.group(1)) * stage_len + int(m.group(2))
        return None if inner is None else f"decoder.upsamples.{index}.{inner}"
    if m := _RE_UP_SAMPLER.match(key):
        index = int(m.group(1)) * stage_len + num_res_blocks + 1
        return f"decoder.upsamples.{index}.{m.group(2)}"
    return None


def _original_to_diffusers(
    original: Mapping[str, Tensor], expected: Mapping[str, torch.Size], num_res_blocks: int, source: str
) -> dict[str, Tensor]:
    # Build the inverse from the target model's own key list, so every key is accounted for both ways.
    to_diffusers = {}
    for key in expected:
        name = diffusers_vae_key_to_original(key, num_res_blocks)
        if name is None:
            raise ValueError(
                f"{source}: no original name for diffusers key {key!r} (unsupported VAE variant)"
            )
        to_diffusers[name] = key
    missing = [name for name in to_diffusers if name not in original]
    unexpected = [name for name in original if name not in to_diffusers]
    misshaped = [
        f"{name}: got {tuple(value.shape)}, expected {tuple(expected[to_diffusers[name]])}"
        for name, value in original.items()
        if name in to_diffusers and tuple(value.shape) != tuple(expected[to_diffusers[name]])
    ]
    raise_key_problems(source, missing, unexpected, misshaped)
    return {to_diffusers[name]: value for name, value in original.items()}


# ---------------------------------------------------------------------------------------------- module


class WanVAE(nn.Module):
    """Frozen Wan VAE with per-channel latent normalisation. No gradients flow through it.

    Args:
        vae: a diffusers ``AutoencoderKLWan`` (Wan2.1 layout: no patching, non-residual blocks).
    """

    def __init__(self, vae: AutoencoderKLWan) -> None:
        super().__init__()
        cfg = vae.config
        if cfg.patch_size is not None or cfg.is_residual:
            raise NotImplementedError(
                f"WanVAE supports the Wan2.1 VAE only; got patch_size={cfg.patch_size}, is_residual={cfg.is_residual}"
            )
        for name in ("latents_mean", "latents_std"):
            if len(getattr(cfg, name)) != cfg.z_dim:
                raise ValueError(
                    f"WanVAE: config {name} has {len(getattr(cfg, name))} values, z_dim is {cfg.z_dim}"
                )
        self.vae = vae
        self.vae.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> WanVAE:
        # Frozen: a parent's .train() must not change it.
        return super().train(False)

    # ------------------------------------------------------------------ geometry

    @property
    def z_dim(self) -> int:
        return self.vae.config.z_dim

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(bool(d) for d in self.vae.config.temperal_downsample)

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.vae.config.dim_mult) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _stats(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Per-channel latent mean and std, float32, shaped ``[C, 1, 1, 1]`` for ``[B, C, F, h, w]``."""
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=device).view(-1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, dtype=torch.float32, device=device).view(-1, 1, 1, 1)
        return mean, std

    def normalize(self, mu: Tensor) -> Tensor:
        """Raw posterior mean ``[B, C, F, h, w]`` -> normalised latents ``[B, F, C, h, w]`` (float32)."""
        mean, std = self._stats(mu.device)
        return ((mu.float() - mean) / std).permute(0, 2, 1, 3, 4)

    def denormalize(self, latents: Tensor) -> Tensor:
        """Normalised latents ``[B, F, C, h, w]`` -> raw VAE latents ``[B, C, F, h, w]`` in the VAE dtype."""
        if latents.ndim != 5 or latents.shape[2] != self.z_dim:
            raise ValueError(
                f"WanVAE: latents must be [B, F, {self.z_dim}, h, w], got {tuple(latents.shape)}"
            )
        mean, std = self._stats(latents.device)
        return (latents.float().permute(0, 2, 1, 3, 4) * std + mean).to(self.dtype)

    # ------------------------------------------------------------------ encode / decode

    @torch.no_grad()
    def encode(self, videos: Tensor) -> Tensor:
        """Pixels ``[B, 3, T, H, W]`` in [-1, 1], ``T = 1 + 4k`` -> latents ``[B, F, C, h, w]`` (videos' dtype).

        Uses the posterior mean (no sampling), as upstream does.
        """
        s, t = self.spatial_compression, self.temporal_compression
        channels, frames, height, width = videos.shape[1:] if videos.ndim == 5 else (-1, -1, -1, -1)
        if (
            channels != self.vae.config.in_channels
            or frames < 1
            or (frames - 1) % t
            or height % s
            or width % s
        ):
            raise ValueError(
                f"WanVAE.encode: videos must be [B, {self.vae.config.in_channels}, 1 + {t}k, H, W] with H, W "
                f"divisible by {s}; got {tuple(videos.shape)}"
            )
        mu = self.vae.encode(videos.to(self.dtype)).latent_dist.mean
        return self.normalize(mu).to(videos.dtype)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[B, F, C, h, w]`` -> pixels ``[B, 1 + 4(F-1), 3, H, W]`` in [-1, 1] (latents' dtype)."""
        pixels = self.vae.decode(self.denormalize(latents)).sample.clamp(-1.0, 1.0)
        return pixels.permute(0, 2, 1, 3, 4).to(latents.dtype)

    def stream_decoder(self) -> StreamingDecoder:
        """A fresh :class:`StreamingDecoder` over this VAE."""
        return StreamingDecoder(self)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_diffusers_folder(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> WanVAE:
        """Load ``<path>/vae/`` of a diffusers-format Wan folder."""
        folder = Path(path) / "vae"
        if not folder.is_dir():
            raise FileNotFoundError(f"WanVAE.from_diffusers_folder: no folder {folder}")
        vae = AutoencoderKLWan.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
        if device is not None:
            vae = vae.to(device)
        logger.info("loaded Wan VAE from %s", folder)
        return cls(vae)

    @classmethod
    def from_original(
        cls,
        pth_path: str | os.PathLike,
        config: Mapping[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> WanVAE:
        """Load Wan's original ``Wan2.1_VAE.pth``. ``config`` holds ``AutoencoderKLWan`` kwargs and
        defaults to :func:`wan21_vae_config`."""
        pth_path = Path(pth_path)
        if not pth_path.is_file():
            raise FileNotFoundError(f"WanVAE.from_original: no file {pth_path}")
        config = dict(config) if config is not None else wan21_vae_config()
        with torch.device("meta"):
            vae = AutoencoderKLWan(**config)
        expected = {k: v.shape for k, v in vae.state_dict().items()}
        original = torch.load(pth_path, map_location="cpu", weights_only=True)
        converted = _original_to_diffusers(
            original, expected, vae.config.num_res_blocks, source=str(pth_path)
        )
        converted = {k: v.to(device=device or "cpu", dtype=dtype) for k, v in converted.items()}
        vae.load_state_dict(converted, strict=True, assign=True)
        logger.info("loaded original Wan VAE from %s", pth_path)
        return cls(vae)

    def to_original_state_dict(self) -> dict[str, Tensor]:
        """Weights under the original Wan VAE key names (inverse of :meth:`from_original`)."""
        out, unknown = {}, []
        for key, value in self.vae.state_dict().items():
            name = diffusers_vae_key_to_original(key, self.vae.config.num_res_blocks)
            if name is None:
                unknown.append(key)
            else:
                out[name] = value
        raise_key_problems("AutoencoderKLWan state dict", [], unknown, [])
        return out


class StreamingDecoder:
    """Decode a latent video chunk by chunk with the decoder's causal temporal cache kept in between.

    Mirrors diffusers' ``AutoencoderKLWan._decode``: the decoder runs one latent frame at a time and
    every causal conv reads/writes its slot of a feature cache (the last ``CACHE_T`` frames of its
    input). The cache lives here, not on the VAE, so full ``decode`` calls do not disturb a stream.
    The first latent frame yields 1 pixel frame, every later one ``temporal_compression`` frames.
    """

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        self._num_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.vae.decoder.modules())
        self.reset()

    def reset(self) -> None:
        """Forget the cache: the next chunk starts a new video."""
        self._feat_cache: list[Any] = [None] * self._num_convs
        self.frames_decoded = 0
        self._batch_size: int | None = None

    @torch.no_grad()
    def decode(self, latent_chunk: Tensor) -> Tensor:
        """Latents ``[B, f, C, h, w]`` (the next ``f`` frames) -> pixels ``[B, T_f, 3, H, W]`` in [-1, 1]."""
        if self._batch_size is not None and latent_chunk.shape[0] != self._batch_size:
            raise ValueError(
                f"StreamingDecoder: batch size changed from {self._batch_size} to {latent_chunk.shape[0]} "
                "mid-stream; call reset() first"
            )
        self._batch_size = latent_chunk.shape[0]
        inner = self.vae.vae
        z = inner.post_quant_conv(self.vae.denormalize(latent_chunk))  # 1x1x1 conv: frame-local
        outs = []
        for i in range(z.shape[2]):
            outs.append(
                inner.decoder(
                    z[:, :, i : i + 1],
                    feat_cache=self._feat_cache,
                    feat_idx=[0],
                    first_chunk=self.frames_decoded == 0,
                )
            )
            self.frames_decoded += 1
        pixels = torch.cat(outs, dim=2).clamp(-1.0, 1.0)
        return pixels.permute(0, 2, 1, 3, 4).to(latent_chunk.dtype)
