"""Attention kernels: flash-attn, PyTorch SDPA and FlexAttention behind one call.

The backend for unmasked attention is chosen once per device type and logged once: flash-attn when it
is installed and the tensors live on CUDA in a half dtype, SDPA otherwise. Block-sparse masks use
FlexAttention (compiled) on CUDA; everywhere else (flex has no CPU backward) a `ChunkedMask` runs one
unmasked SDPA call per chunk of queries over exactly the keys that chunk may see: the same softmax as
a dense boolean mask, without computing the masked-out scores (about 40% of them for 7 causal blocks).
A dense boolean mask is still accepted.

All tensors here are `[B, L, H, D]` (batch, tokens, heads, head dim).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

try:  # flash-attn is optional and CUDA only; never required.
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore[import-not-found]
except Exception:  # noqa: BLE001 - any import failure (missing, ABI mismatch) means "not available"
    _flash_attn_func = None

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # torch < 2.5
    BlockMask = None  # type: ignore[assignment,misc]
    create_block_mask = None  # type: ignore[assignment]
    flex_attention = None  # type: ignore[assignment]

_reported: set[str] = set()


def flex_available(device: torch.device) -> bool:
    """FlexAttention with a compiled kernel (forward and backward) runs on CUDA only."""
    return flex_attention is not None and device.type == "cuda"


def flash_available(q: torch.Tensor) -> bool:
    return _flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def describe_backends(device: torch.device) -> dict[str, str]:
    """What attention kernels run on `device`: unmasked attention and block-causal attention."""
    dense = "flash-attn" if (_flash_attn_func is not None and device.type == "cuda") else "sdpa"
    masked = "flex" if flex_available(device) else "sdpa-chunked"
    return {"attention": dense, "block_mask": masked}


def _report(kind: str, name: str) -> None:
    key = f"{kind}:{name}"
    if key not in _reported:
        _reported.add(key)
        logger.info("attention backend for %s: %s", kind, name)


@functools.cache
def _compiled_flex():
    # Compiled once per process; dynamic=False because shapes are fixed per training config.
    return torch.compile(flex_attention, dynamic=False)


@dataclass(frozen=True)
class ChunkedMask:
    """A block-sparse mask as `(query token slice, key token slices)` chunks.

    Every query of a chunk may attend to exactly the keys in its slices (and to no other key); the
    chunks cover the queries in order. Built from frame-level rules by `wan.masks.chunked_mask`.
    """

    chunks: tuple[tuple[slice, tuple[slice, ...]], ...]


def _chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: ChunkedMask) -> torch.Tensor:
    outs = []
    for q_sl, k_sls in mask.chunks:
        if len(k_sls) == 1:  # a contiguous key range: views, no copy
            kc, vc = k[:, k_sls[0]], v[:, k_sls[0]]
        else:
            kc = torch.cat([k[:, sl] for sl in k_sls], dim=1)
            vc = torch.cat([v[:, sl] for sl in k_sls], dim=1)
        out = F.scaled_dot_product_attention(
            q[:, q_sl].transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
        )
        outs.append(out.transpose(1, 2))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | Any | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with softmax scale 1/sqrt(D).

    Args:
        q: `[B, Lq, H, D]`; k, v: `[B, Lk, H, D]`.
        mask: None (full attention), a `ChunkedMask`, a boolean `[Lq, Lk]` tensor (True = may attend)
            or a FlexAttention `BlockMask` over the same lengths.
    Returns:
        `[B, Lq, H, D]` in q's dtype.
    """
    if mask is None:
        if flash_available(q):
            _report("attention", "flash-attn")
            return _flash_attn_func(q, k, v)
        _report("attention", "sdpa")
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    if isinstance(mask, ChunkedMask):
        _report("block_mask", "sdpa-chunked")
        return _chunked_attention(q, k, v, mask)
    if BlockMask is not None and isinstance(mask, BlockMask):
        _report("block_mask", "flex")
        fn = _compiled_flex() if q.is_cuda else flex_attention
        out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask)
        return out.transpose(1, 2)
    _report("block_mask", "sdpa-dense-mask")
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask.to(q.device)
    )
    return out.transpose(1, 2)
