"""Frozen umT5-XXL text encoder used by Wan2.1 (spec §1.9).

The network is transformers' ``UMT5EncoderModel`` (per-layer relative position bias, gated-GELU FFN,
no attention scaling), so the same module loads either a diffusers-format Wan folder
(``text_encoder/`` + ``tokenizer/``) or Wan's original ``models_t5_umt5-xxl-enc-bf16.pth`` through an
explicit key mapping. Prompts are cleaned as upstream does, padded/truncated to ``text_len`` tokens,
and every output position at or past a prompt's true length is zeroed.
"""

from __future__ import annotations

import html
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import ftfy
import torch
import transformers
from torch import Tensor, nn
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from .weights import raise_key_problems

logger = logging.getLogger(__name__)

__all__ = [
    "WanTextEncoder",
    "clean_prompt",
    "original_t5_to_transformers",
    "transformers_t5_to_original",
    "umt5_xxl_config",
]

# Per-block names: original Wan ``blocks.{i}.<suffix>`` <-> transformers ``encoder.block.{i}.<suffix>``.
# Wan's FFN is ``fc2(fc1(x) * gelu_tanh(gate(x)))`` and transformers' gated FFN is
# ``wo(gelu_new(wi_0(x)) * wi_1(x))``, so the activated branch ``gate.0`` is ``wi_0`` and ``fc1`` is ``wi_1``.
_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_GLOBAL_KEYS = {
    "token_embedding.weight": "shared.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
}
# transformers keeps a second, tied name for the input embedding; it is filled from ``shared.weight``.
_TIED_EMBEDDING_KEY = "encoder.embed_tokens.weight"

_ORIGINAL_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_TRANSFORMERS_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")
_BLOCK_KEYS_INVERSE = {v: k for k, v in _BLOCK_KEYS.items()}
_GLOBAL_KEYS_INVERSE = {v: k for k, v in _GLOBAL_KEYS.items()}


def umt5_xxl_config() -> UMT5Config:
    """Hyper-parameters of Wan's umT5-XXL encoder (``umt5_xxl(encoder_only=True)``)."""
    return UMT5Config(
        vocab_size=256384,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=False,
        use_cache=False,
    )


# ---------------------------------------------------------------------------------------------- text


def clean_prompt(text: str) -> str:
    """Upstream's prompt cleaning: ftfy repair, HTML-unescape twice (double-escaped scrapes), collapse
    whitespace."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------------------------------------- keys


def _map_key(
    key: str, block_re: re.Pattern, block_prefix: str, block_map: dict, global_map: dict
) -> str | None:
    if key in global_map:
        return global_map[key]
    match = block_re.match(key)
    if match is None or match.group(2) not in block_map:
        return None
    return f"{block_prefix}{match.group(1)}.{block_map[match.group(2)]}"


def original_t5_to_transformers(
    state_dict: Mapping[str, Tensor],
    expected: Mapping[str, torch.Size] | None = None,
    source: str = "state dict",
) -> dict[str, Tensor]:
    """Rename Wan's original umT5 encoder keys to transformers' ``UMT5EncoderModel`` names.

    ``expected`` maps each transformers key to its shape; when given, every missing, unexpected or
    mis-shaped key is reported in one ``ValueError`` that names ``source``. The tied
    ``encoder.embed_tokens.weight`` is filled from the token embedding.
    """
    converted: dict[str, Tensor] = {}
    unexpected = []
    for key, value in state_dict.items():
        new_key = _map_key(key, _ORIGINAL_BLOCK, "encoder.block.", _BLOCK_KEYS, _GLOBAL_KEYS)
        if new_key is None:
            unexpected.append(key)
        else:
            converted[new_key] = value
    if "shared.weight" in converted and (expected is None or _TIED_EMBEDDING_KEY in expected):
        converted[_TIED_EMBEDDING_KEY] = converted["shared.weight"]
    missing, misshaped = [], []
    if expected is not None:

        def original_name(k: str) -> str:
            return transformers_key_to_original(k) or k

        missing = [original_name(k) for k in expected if k not in converted and k != _TIED_EMBEDDING_KEY]
        unexpected += [original_name(k) for k in converted if k not in expected]
        misshaped = [
            f"{original_name(k)}: got {tuple(v.shape)}, expected {tuple(expected[k])}"
            for k, v in converted.items()
            if k in expected and tuple(v.shape) != tuple(expected[k]) and k != _TIED_EMBEDDING_KEY
        ]
    raise_key_problems(source, missing, unexpected, misshaped)
    return converted


def transformers_key_to_original(key: str) -> str | None:
    """Original Wan name of one transformers umT5 key (``None`` for keys with no original name)."""
    return _map_key(key, _TRANSFORMERS_BLOCK, "blocks.", _BLOCK_KEYS_INVERSE, _GLOBAL_KEYS_INVERSE)


def transformers_t5_to_original(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`original_t5_to_transformers`; the tied embedding alias is dropped."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        if key == _TIED_EMBEDDING_KEY:
            continue
        new_key = transformers_key_to_original(key)
        if new_key is None:
            unknown.append(key)
        else:
            out[new_key] = value
    raise_key_problems("transformers umT5 state dict", [], unknown, [])
    return out


def _load_original_checkpoint(path: Path) -> dict[str, Tensor]:
    try:
        # mmap keeps the 11 GB XXL checkpoint out of RAM until each tensor is copied to its target.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # Legacy (non-zip) torch.save files cannot be memory-mapped.
        return torch.load(path, map_location="cpu", weights_only=True)


def _transformers_dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # transformers 5 renamed ``torch_dtype`` to ``dtype``.
    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


# ---------------------------------------------------------------------------------------------- module


class WanTextEncoder(nn.Module):
    """Frozen umT5 encoder plus tokenizer: ``list[str] -> {"prompt_embeds": [B, text_len, d_model]}``.

    Args:
        encoder: a transformers ``UMT5EncoderModel``; frozen and put in eval mode here.
        tokenizer: its tokenizer (right padding is enforced so "true length" is a prefix).
        text_len: pad/truncate every prompt to this many tokens (512 in Wan).
    """

    def __init__(self, encoder: UMT5EncoderModel, tokenizer, text_len: int = 512) -> None:
        super().__init__()
        if text_len < 1:
            raise ValueError(f"WanTextEncoder: text_len must be >= 1, got {text_len}")
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"
        self.text_len = text_len
        self.encoder.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> WanTextEncoder:
        # Frozen: a parent's .train() must not switch on the encoder's dropout.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def dim(self) -> int:
        return self.encoder.config.d_model

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_diffusers_folder(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        text_len: int = 512,
    ) -> WanTextEncoder:
        """Load ``<path>/text_encoder/`` and ``<path>/tokenizer/`` of a diffusers-format Wan folder."""
        root = Path(path)
        missing = [str(root / sub) for sub in ("text_encoder", "tokenizer") if not (root / sub).is_dir()]
        if missing:
            raise FileNotFoundError(f"WanTextEncoder.from_diffusers_folder: missing folder(s) {missing}")
        encoder = UMT5EncoderModel.from_pretrained(
            root / "text_encoder", local_files_only=True, **_transformers_dtype_kwarg(dtype)
        )
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        if device is not None:
            encoder = encoder.to(device)
        logger.info("loaded umT5 encoder from %s", root)
        return cls(encoder, tokenizer, text_len=text_len)

    @classmethod
    def from_original(
        cls,
        pth_path: str | os.PathLike,
        tokenizer_path: str | os.PathLike,
        config: UMT5Config | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        text_len: int = 512,
    ) -> WanTextEncoder:
        """Load Wan's original ``models_t5_umt5-xxl-enc-bf16.pth`` and a local tokenizer folder
        (``google/umt5-xxl`` layout). ``config`` defaults to :func:`umt5_xxl_config`."""
        pth_path = Path(pth_path)
        if not pth_path.is_file():
            raise FileNotFoundError(f"WanTextEncoder.from_original: no file {pth_path}")
        config = config if config is not None else umt5_xxl_config()
        # Build on meta so the XXL model costs no memory until the checkpoint tensors are assigned.
        with torch.device("meta"):
            encoder = UMT5EncoderModel(config)
        expected = {k: v.shape for k, v in encoder.state_dict().items()}
        original = _load_original_checkpoint(pth_path)
        converted = original_t5_to_transformers(original, expected, source=str(pth_path))
        converted = {
            k: v.to(device=device or "cpu", dtype=dtype)
            for k, v in converted.items()
            if k != _TIED_EMBEDDING_KEY
        }
        if _TIED_EMBEDDING_KEY in expected:
            converted[_TIED_EMBEDDING_KEY] = converted["shared.weight"]
        encoder.load_state_dict(converted, strict=True, assign=True)
        # ``assign`` gives the two embedding names separate Parameters; re-tie them so one copy exists.
        encoder.encoder.embed_tokens.weight = encoder.shared.weight
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        logger.info("loaded original umT5 encoder from %s", pth_path)
        return cls(encoder, tokenizer, text_len=text_len)

    def to_original_state_dict(self) -> dict[str, Tensor]:
        """The encoder's weights under Wan's original key names (inverse of :meth:`from_original`)."""
        return transformers_t5_to_original(self.encoder.state_dict())

    # ------------------------------------------------------------------ forward

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Clean and tokenize: returns ``input_ids`` and ``attention_mask``, both ``[B, text_len]``."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"WanTextEncoder: prompts must be a non-empty list of strings, got {prompts!r}")
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> dict[str, Tensor]:
        """Encode prompts: ``{"prompt_embeds": [B, text_len, d_model]}`` in the encoder's dtype, with
        positions at or past each prompt's token count set to exactly 0."""
        ids, mask = self.tokenize(prompts)
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        lengths = mask.sum(dim=1)
        valid = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
        embeds = torch.where(
            valid[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)
        )
        return {"prompt_embeds": embeds}
