"""KV and cross-attention caches for block-by-block causal inference (spec §2.3).

Design (deliberately different from upstream's dict-of-tensors with in-place shifting):

* Keys/values are stored per transformer block in preallocated `[B, capacity, H, D]` buffers,
  *after* RoPE, addressed by absolute frame index.
* Without a window, frame f lives in slots `[f*T, (f+1)*T)` and capacity is `max_frames` frames.
* With a rolling window of `L = local_attn_size` frames and `S = sink_size` sink frames, capacity is
  L frames: frames `< S` keep their slots forever, later frames go to a ring of `L - S` frames.
  Nothing is ever shifted; attention does not depend on key order (positions are already in the
  keys), so attending to the whole buffer once it is full is exactly "sink + last L - S frames".
* A forward with grad enabled never writes; it reads the context (a constant to autograd) before
  the block runs and attends to its own fresh keys in addition (see `LayerKVCache.hook`).
"""

from __future__ import annotations

import torch


class LayerKVCache:
    """One transformer block's self-attention cache; shares its bookkeeping with the `KVCache`."""

    def __init__(self, parent: KVCache, k: torch.Tensor, v: torch.Tensor) -> None:
        self.parent = parent
        self.k = k
        self.v = v

    def hook(self, start_frame: int, num_frames: int):
        """Return the KV hook for a call covering frames `[start_frame, start_frame + num_frames)`.

        With grad enabled the cached context is read *now*, before the block runs, so gradient
        checkpointing recomputes the block against exactly the context the forward saw, even if
        later blocks overwrite ring-buffer slots before backward.
        """
        p = self.parent
        end_frame = start_frame + num_frames
        tpf = p.tokens_per_frame

        if torch.is_grad_enabled():
            # Differentiable call: context from the cache (a constant), own keys fresh; no write.
            k_ctx, v_ctx = self._gather(p.context_slots(start_frame, end_frame))

            def read_only(k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return torch.cat([k_ctx, k_new], dim=1), torch.cat([v_ctx, v_new], dim=1)

            return read_only

        def write_and_read(k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            slots = p.frame_slots(start_frame, end_frame)
            if slots == list(range(slots[0], slots[0] + len(slots))):  # contiguous: one copy
                sl = slice(slots[0] * tpf, (slots[-1] + 1) * tpf)
                self.k[:, sl] = k_new
                self.v[:, sl] = v_new
            else:
                for j, s in enumerate(slots):
                    self.k[:, s * tpf : (s + 1) * tpf] = k_new[:, j * tpf : (j + 1) * tpf]
                    self.v[:, s * tpf : (s + 1) * tpf] = v_new[:, j * tpf : (j + 1) * tpf]
            return self._gather(p.window_slots(end_frame))

        return write_and_read

    def _gather(self, frame_slots: list[int] | slice) -> tuple[torch.Tensor, torch.Tensor]:
        tpf = self.parent.tokens_per_frame
        if isinstance(frame_slots, slice):
            sl = slice(frame_slots.start * tpf, frame_slots.stop * tpf)
            return self.k[:, sl], self.v[:, sl]
        token_idx = (
            torch.tensor(frame_slots, dtype=torch.long, device=self.k.device)[:, None] * tpf
            + torch.arange(tpf, device=self.k.device)
        ).flatten()
        return self.k.index_select(1, token_idx), self.v.index_select(1, token_idx)


class KVCache:
    """Self-attention KV cache for all transformer blocks of a `CausalWanModel`.

    Args:
        num_layers, num_heads, head_dim: from the model config.
        batch_size: videos generated together.
        tokens_per_frame: DiT tokens per latent frame.
        max_frames: capacity without a window (frames); ignored with a window.
        local_attn_size: window in frames (-1 = global attention over all cached frames).
        sink_size: frames at the head of the video never evicted from the window.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        tokens_per_frame: int,
        num_heads: int,
        head_dim: int,
        max_frames: int,
        local_attn_size: int = -1,
        sink_size: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if local_attn_size != -1:
            if local_attn_size <= sink_size:
                raise ValueError(f"local_attn_size={local_attn_size} must exceed sink_size={sink_size}")
            capacity = local_attn_size
        else:
            if sink_size:
                raise ValueError("sink_size needs a rolling window (local_attn_size != -1)")
            capacity = max_frames
        self.tokens_per_frame = tokens_per_frame
        self.num_heads = num_heads
        self.capacity_frames = capacity
        self.local_attn_size = local_attn_size
        self.sink_size = sink_size
        self.max_frames = max_frames
        shape = (batch_size, capacity * tokens_per_frame, num_heads, head_dim)
        self.layers = [
            LayerKVCache(
                self,
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(num_layers)
        ]
        self.end_frame = 0  # frames [0, end_frame) have been written (by no-grad calls)

    @classmethod
    def for_model(
        cls,
        model,
        batch_size: int,
        latent_hw: tuple[int, int],
        max_frames: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        """Allocate a cache sized from a `CausalWanModel`'s config and attention window.

        Under sequence parallelism each rank caches the whole sequence for its `num_heads / sp` heads
        (the keys/values its attention reads after the Ulysses all-to-all), `1/sp` of the cache."""
        cfg = model.config
        sp = model.sequence_parallel
        return cls(
            cfg.num_layers,
            batch_size,
            cfg.tokens_per_frame(*latent_hw),
            cfg.num_heads // (sp.size if sp is not None else 1),
            cfg.head_dim,
            max_frames,
            model.local_attn_size,
            model.sink_size,
            dtype,
            device,
        )

    @property
    def rolling(self) -> bool:
        return self.local_attn_size != -1

    def reset(self) -> None:
        """Start a new video: forget every cached frame (buffers are reused, not reallocated)."""
        self.end_frame = 0

    # -- slot arithmetic (frame granularity) --
    def _slot(self, frame: int) -> int:
        if not self.rolling or frame < self.sink_size:
            return frame
        ring = self.capacity_frames - self.sink_size
        return self.sink_size + (frame - self.sink_size) % ring

    def frame_slots(self, start: int, end: int) -> list[int]:
        """Slots for writing frames `[start, end)`; validates the call against the cache limits."""
        if start > self.end_frame:
            raise ValueError(
                f"KV cache: block starts at frame {start} but only {self.end_frame} frames are cached"
            )
        if not self.rolling and end > self.capacity_frames:
            raise ValueError(
                f"KV cache holds at most max_frames={self.capacity_frames} latent frames without a rolling "
                f"window; frame {end - 1} requested. Set local_attn_size (and sink_size) to generate longer."
            )
        if self.rolling:
            ring = self.capacity_frames - self.sink_size
            if end - start > ring:
                raise ValueError(
                    f"a block of {end - start} frames does not fit the rolling window of "
                    f"local_attn_size - sink_size = {ring} frames"
                )
            self._check_latest(start, end)
        self.end_frame = max(self.end_frame, end)
        return [self._slot(f) for f in range(start, end)]

    def _check_latest(self, start: int, end: int) -> None:
        # In a ring, frames newer than the block would sit inside its window: only the newest block
        # (or a new one) may be (re-)run.
        if end < self.end_frame:
            raise ValueError(
                f"rolling KV cache: block [{start}, {end}) is older than the newest cached frame "
                f"{self.end_frame - 1}; only the newest block can be re-run"
            )

    def window_slots(self, end: int) -> slice:
        """Slots attended to by a block ending at frame `end` (it has just been written)."""
        return slice(0, min(end, self.capacity_frames))

    def context_slots(self, start: int, end: int) -> list[int] | slice:
        """Slots of the cached frames a block `[start, end)` attends to, excluding the block itself."""
        if start > self.end_frame:
            raise ValueError(
                f"KV cache: block starts at frame {start} but only {self.end_frame} frames are cached"
            )
        if not self.rolling:
            if end > self.capacity_frames:
                raise ValueError(
                    f"KV cache holds at most max_frames={self.capacity_frames} latent frames; frame {end - 1} requested"
                )
            return slice(0, start)
        self._check_latest(start, end)
        ring = self.capacity_frames - self.sink_size
        first = max(self.sink_size, end - ring)
        frames = list(range(min(self.sink_size, start))) + list(range(first, start))
        return [self._slot(f) for f in frames]


class CrossAttentionCache:
    """Text keys/values per transformer block, computed once per video by the first no-grad call."""

    def __init__(self, num_layers: int) -> None:
        self.kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers

    def slot(self, layer: int, context: torch.Tensor | None) -> TextKVSlot:
        """Handle through which block `layer` reads (or fills) its entry, inside its own forward."""
        return TextKVSlot(self, layer, context)

    @classmethod
    def for_model(cls, model) -> CrossAttentionCache:
        return cls(model.config.num_layers)

    @property
    def is_init(self) -> bool:
        return all(kv is not None for kv in self.kv)

    def reset(self) -> None:
        self.kv = [None] * len(self.kv)


class TextKVSlot:
    """One block's cross-attention cache entry plus the embedded context to fill it from.

    The block computes the keys/values inside its own forward (where FSDP has gathered its
    parameters) and stores them here.
    """

    def __init__(self, cache: CrossAttentionCache, layer: int, context: torch.Tensor | None) -> None:
        self.cache = cache
        self.layer = layer
        self.context = context

    def get(self, compute) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.cache.kv[self.layer]
        if kv is None:
            if self.context is None:
                raise ValueError(
                    f"cross-attention cache of block {self.layer} is empty and no context was given"
                )
            kv = compute(self.context)
            self.cache.kv[self.layer] = kv
        return kv
