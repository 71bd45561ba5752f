"""Wan2.1 networks: the bidirectional teacher/critic, the block-causal generator and their caches."""

from .cache import CrossAttentionCache, KVCache
from .causal_model import CausalWanModel
from .config import PRESETS, WanConfig
from .model import WanModel
from .wrapper import WanDiffusionWrapper

# The text encoder and the VAE wrap transformers and diffusers, which take seconds to import; a run
# that never builds them (a codec/encoder given as a component, a CLI error) does not pay for them.
_LAZY = {"WanTextEncoder": "text_encoder", "WanVAE": "vae", "StreamingDecoder": "vae"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
