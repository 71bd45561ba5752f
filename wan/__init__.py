"""Wan2.1 networks: the bidirectional teacher/critic, the block-causal generator and their caches."""

from .cache import CrossAttentionCache, KVCache
from .causal_model import CausalWanModel
from .config import PRESETS, WanConfig
from .model import WanModel
from .text_encoder import WanTextEncoder
from .vae import StreamingDecoder, WanVAE
from .wrapper import WanDiffusionWrapper

__all__ = [
    "PRESETS",
    "StreamingDecoder",
    "CausalWanModel",
    "CrossAttentionCache",
    "KVCache",
    "WanConfig",
    "WanDiffusionWrapper",
    "WanModel",
    "WanTextEncoder",
    "WanVAE",
]
