"""Tiny random stand-ins for the frozen networks, so every job runs on a CPU without weight files.

`toy_text_encoder` is a real `WanTextEncoder` (transformers' UMT5 encoder) with a byte-level BPE
tokenizer trained in memory on a fixed corpus; `toy_vae` is a real `WanVAE` (diffusers'
AutoencoderKLWan) with a few channels. Both are seeded, so every process builds identical weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from .config import WanConfig
from .model import WanModel

if TYPE_CHECKING:  # transformers and diffusers take seconds to import: only the toy encoder/VAE need them
    from transformers import PreTrainedTokenizerFast

    from .text_encoder import WanTextEncoder
    from .vae import WanVAE

TOY_SEED = 1234  # every process builds the same toy teacher from this seed

_CORPUS = [
    "a cat walks along a sunny street in the city",
    "waves crash on a rocky beach at sunset, slow motion",
    "a red car drives through a snowy mountain road at night",
    "close-up of a dog running in a green park with trees",
    "timelapse of clouds moving over a lake and forest",
]


def toy_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Byte-level BPE (covers any UTF-8 text) with T5's special tokens and a trailing `</s>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def toy_text_encoder(text_dim: int = 32, text_len: int = 16, seed: int = 0) -> WanTextEncoder:
    """A 2-layer umT5 encoder of width `text_dim` with random (seeded) weights."""
    from transformers import UMT5Config, UMT5EncoderModel

    from .text_encoder import WanTextEncoder

    tokenizer = toy_tokenizer()
    cfg = UMT5Config(
        vocab_size=len(tokenizer),
        d_model=text_dim,
        d_kv=max(4, text_dim // 4),
        d_ff=2 * text_dim,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = UMT5EncoderModel(cfg)
    return WanTextEncoder(encoder, tokenizer, text_len=text_len)


def toy_vae(z_dim: int = 4, base_dim: int = 8, seed: int = 0) -> WanVAE:
    """A Wan VAE (temporal x4, spatial x8 compression like the real one) with few channels."""
    from diffusers import AutoencoderKLWan

    from .vae import WanVAE

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(
            base_dim=base_dim,
            z_dim=z_dim,
            dim_mult=[1, 2, 4, 4],
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False, True, True],
            latents_mean=[0.0] * z_dim,
            latents_std=[1.0] * z_dim,
        )
    return WanVAE(vae)


def toy_dit_state_dict(wcfg: WanConfig, seed: int = TOY_SEED) -> dict[str, torch.Tensor]:
    """Seeded random weights for a toy DiT (head not zero-initialised, so the toy teacher is not trivial)."""
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        model = WanModel(wcfg)
        nn.init.normal_(model.head.head.weight, std=0.02)
    return model.state_dict()
