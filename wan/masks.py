"""Block-causal attention masks for the causal Wan model (spec §2.2).

Every rule is stated once at *frame* level (`[Fq, Fk]` booleans); a token may attend to another iff
their frames may. The SDPA path turns the frame mask into chunks of query tokens with their allowed key
ranges (`chunked_mask`), the FlexAttention path looks it up inside `mask_mod`, and `dense_token_mask`
expands it to tokens; all backends use the same rule by construction.

Rule (no window): a frame sees every frame of its own chunk (bidirectional inside a chunk) and all
earlier chunks. With a local window of `L` frames and `S` sink frames, a frame whose chunk ends at
frame `e` additionally needs the key frame to lie in `[e - (L - S), e)` or in the sink `[0, S)`;
this is exactly the set of frames a rolling KV cache of `L` frames (with `S` sink frames) holds when
that chunk is generated, so cached inference and the training path agree.
"""

from __future__ import annotations

import torch

from .attention import ChunkedMask, create_block_mask, flex_available


def chunk_sizes(num_frames: int, num_frame_per_block: int, independent_first_frame: bool) -> list[int]:
    """Chunk layout `[N, N, ...]` or `[1, N, N, ...]` (independent first frame) covering `num_frames`."""
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    rest = num_frames - 1 if independent_first_frame else num_frames
    if rest % num_frame_per_block != 0:
        layout = "1 + k*N" if independent_first_frame else "k*N"
        raise ValueError(
            f"{num_frames} latent frames do not split into chunks of num_frame_per_block="
            f"{num_frame_per_block} (need {layout} frames)"
        )
    sizes = [1] if independent_first_frame else []
    return sizes + [num_frame_per_block] * (rest // num_frame_per_block)


def chunk_ends(sizes: list[int]) -> torch.Tensor:
    """For each frame, the (exclusive) index of the last frame of its chunk: `[F]` long."""
    ends = []
    pos = 0
    for n in sizes:
        pos += n
        ends.extend([pos] * n)
    return torch.tensor(ends, dtype=torch.long)


def _window_ok(kv: torch.Tensor, end: torch.Tensor, local_attn_size: int, sink_size: int) -> torch.Tensor:
    if local_attn_size == -1:
        return torch.ones_like(kv, dtype=torch.bool) if kv.dim() else torch.tensor(True)
    return (kv >= end - (local_attn_size - sink_size)) | (kv < sink_size)


def block_causal_frame_mask(
    num_frames: int,
    num_frame_per_block: int,
    independent_first_frame: bool = False,
    local_attn_size: int = -1,
    sink_size: int = 0,
) -> torch.Tensor:
    """`[F, F]` bool: may frame q attend to frame k."""
    ends = chunk_ends(chunk_sizes(num_frames, num_frame_per_block, independent_first_frame))
    q_end = ends[:, None]
    kv = torch.arange(num_frames)[None, :]
    return (kv < q_end) & _window_ok(kv, q_end, local_attn_size, sink_size)


def teacher_forcing_frame_mask(
    num_frames: int,
    num_frame_per_block: int,
    local_attn_size: int = -1,
    sink_size: int = 0,
) -> torch.Tensor:
    """`[2F, 2F]` bool for the sequence `[clean frames | noisy frames]` (spec §2.2).

    Clean frames: block-causal among clean frames. A noisy frame in chunk b sees the noisy frames of
    chunk b and the clean frames of chunks before b (the context the KV cache would hold).
    """
    clean = block_causal_frame_mask(num_frames, num_frame_per_block, False, local_attn_size, sink_size)
    ends = chunk_ends(chunk_sizes(num_frames, num_frame_per_block, False))
    starts = ends - num_frame_per_block
    kv = torch.arange(num_frames)[None, :]
    q_end, q_start = ends[:, None], starts[:, None]
    noisy_to_clean = (kv < q_start) & _window_ok(kv, q_end, local_attn_size, sink_size)
    noisy_to_noisy = (kv >= q_start) & (kv < q_end)
    top = torch.cat([clean, torch.zeros_like(clean)], dim=1)
    bottom = torch.cat([noisy_to_clean, noisy_to_noisy], dim=1)
    return torch.cat([top, bottom], dim=0)


def dense_token_mask(frame_mask: torch.Tensor, tokens_per_frame: int, device: torch.device) -> torch.Tensor:
    """Expand a frame mask to tokens: `[Fq*T, Fk*T]` bool on `device`."""
    ones = torch.ones(tokens_per_frame, tokens_per_frame, dtype=torch.bool)
    return torch.kron(frame_mask.to(torch.uint8), ones.to(torch.uint8)).bool().to(device)


def _runs(allowed: list[bool]) -> list[tuple[int, int]]:
    """`[start, end)` runs of consecutive True entries."""
    runs, start = [], None
    for i, ok in enumerate([*allowed, False]):
        if ok and start is None:
            start = i
        elif not ok and start is not None:
            runs.append((start, i))
            start = None
    return runs


def chunked_mask(frame_mask: torch.Tensor, tokens_per_frame: int) -> ChunkedMask:
    """The same rule as `dense_token_mask`, as chunks for block-sparse SDPA.

    Consecutive query frames whose rows of the frame mask are equal form one chunk (a block of a
    block-causal mask); its keys are the runs of allowed key frames, as token slices.
    """
    tpf = tokens_per_frame
    rows = [tuple(bool(v) for v in row) for row in frame_mask.tolist()]
    chunks = []
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[start]:
            runs = _runs(list(rows[start]))
            if not runs:
                raise ValueError(f"frame {start} of the mask may attend to no frame")
            keys = tuple(slice(a * tpf, b * tpf) for a, b in runs)
            chunks.append((slice(start * tpf, i * tpf), keys))
            start = i
    return ChunkedMask(tuple(chunks))


def flex_block_mask(frame_mask: torch.Tensor, tokens_per_frame: int, device: torch.device):
    """FlexAttention `BlockMask` for the same rule (looked up from the frame mask)."""
    fm = frame_mask.to(device)
    tpf = tokens_per_frame

    def mask_mod(b, h, q_idx, kv_idx):
        return fm[q_idx // tpf, kv_idx // tpf]

    lq, lk = fm.shape[0] * tpf, fm.shape[1] * tpf
    # Compiled mask construction on accelerators never materialises the dense [Lq, Lk] mask
    # (32760^2 for the 1.3B geometry); the eager path is fine for CPU-sized tests.
    return create_block_mask(
        mask_mod,
        B=None,
        H=None,
        Q_LEN=lq,
        KV_LEN=lk,
        device=device,
        _compile=torch.device(device).type != "cpu",
    )


class MaskCache:
    """Builds the token mask for a frame rule and a device, rebuilding it whenever the shape changes.

    Upstream builds the mask once and reuses it forever (spec §9.14); here the key includes every
    input of the rule, so a call with another frame count or resolution gets its own mask.
    """

    def __init__(self, max_entries: int = 4) -> None:
        self._entries: dict[tuple, object] = {}
        self._max = max_entries

    def get(self, key: tuple, frame_mask_fn, tokens_per_frame: int, device: torch.device, use_flex: bool):
        full_key = (*key, tokens_per_frame, str(device), use_flex)
        if full_key not in self._entries:
            if len(self._entries) >= self._max:
                self._entries.pop(next(iter(self._entries)))
            frame_mask = frame_mask_fn()
            if use_flex:
                self._entries[full_key] = flex_block_mask(frame_mask, tokens_per_frame, device)
            else:
                self._entries[full_key] = chunked_mask(frame_mask, tokens_per_frame)
        return self._entries[full_key]


def use_flex_for(device: torch.device, requested: str) -> bool:
    """`requested` is "auto" (flex on CUDA), "flex" or "sdpa"."""
    if requested == "sdpa":
        return False
    if requested == "flex":
        if create_block_mask is None:
            raise RuntimeError("FlexAttention is not available in this torch build")
        return True
    return flex_available(device)
