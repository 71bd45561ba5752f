"""Activation memory of one Wan DiT forward + backward per rank, at sp = 1, 2, 4, 8, from measured bytes.

    python scripts/activation_memory.py                            # 1.3B and 14B widths, bf16, the table
    torchrun --nproc_per_node 2 scripts/activation_memory.py --sp 2  # per-rank bytes measured at sp = 2

What is measured: the bytes autograd keeps for backward during the forward (every tensor the forward
saves, counted once per storage, parameters excluded) of the bidirectional DiT (teacher / critic; the
causal training path keeps the same tensors per block) at the preset's real width (dim, FFN, heads,
512 x 4096 text), batch 1, for 1 and 2 layers at two token counts. Those four runs give, exactly:

    bytes(layers, tokens) = fixed + per_layer * layers + (per_token + per_token_layer * layers) * tokens

(`per_layer`: the text keys/values each block keeps; `per_token`: embeddings, head). The full geometry
then is `layers` of the preset and 21 latent frames of 480x832 (32760 tokens), each rank holding
`tokens / sp` of them: every per-token tensor of a block is a shard (token-sharded, or the whole
sequence for `heads / sp` heads after the all-to-all). Without gradient checkpointing the peak is the
saved bytes; with it, each block keeps its input and backward recomputes one block at a time, so the
peak is the checkpointed saved bytes plus one block's. Not counted: weights, gradients, optimizer
states, the transient buffers of a single kernel, and allocator slack.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from wan import WanConfig, WanModel

GIB = 2**30
PRESETS = {"wan2.1-t2v-1.3b": "1.3B", "wan2.1-t2v-14b": "14B"}
FULL_FRAMES, FULL_LATENT = 21, (60, 104)  # 81 frames at 480x832 -> 21 x 1560 = 32760 tokens
# The measured grid: 1 and 2 frames of 8x8 latents (16 tokens each). Saved bytes are exact counts and
# linear in the tokens (the attention kernels keep O(tokens) statistics), so small grids suffice.
MEASURE_LATENT, MEASURE_FRAMES = (8, 8), (1, 2)


def saved_bytes(fn, exclude: set[int]) -> int:
    """Bytes of the distinct storages that autograd saves for backward while `fn()` runs (not `exclude`)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def measure(
    cfg: WanConfig, layers: int, frames: int, dtype: torch.dtype, checkpointing: bool, comm=None
) -> int:
    """Saved bytes of one forward of a `layers`-deep DiT of `cfg`'s width over `frames` latent frames."""
    with torch.device("meta"):
        model = WanModel(cfg.replace(num_layers=layers)).to(dtype)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # values do not change what is saved; keep them finite and small
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.enable_gradient_checkpointing(checkpointing)
    model.enable_sequence_parallel(comm)
    x = torch.randn(1, cfg.in_dim, frames, *MEASURE_LATENT, generator=g).to(dtype)
    context = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g).to(dtype)
    t = torch.full((1,), 500.0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return saved_bytes(lambda: model(x, t, context), params)


def fit(cfg: WanConfig, dtype: torch.dtype, checkpointing: bool, comm=None) -> dict[str, float]:
    """The four coefficients from runs at 1 and 2 layers and two token counts (exact for this form)."""
    n1, n2 = (f * cfg.tokens_per_frame(*MEASURE_LATENT) for f in MEASURE_FRAMES)
    m = {
        (lay, n): measure(cfg, lay, f, dtype, checkpointing, comm)
        for lay in (1, 2)
        for n, f in zip((n1, n2), MEASURE_FRAMES, strict=True)
    }
    per_token_layer = ((m[2, n2] - m[1, n2]) - (m[2, n1] - m[1, n1])) / (n2 - n1)
    per_layer = (m[2, n1] - m[1, n1]) - per_token_layer * n1
    per_token = (m[1, n2] - m[1, n1]) / (n2 - n1) - per_token_layer
    fixed = m[1, n1] - per_layer - (per_token + per_token_layer) * n1
    return {
        "fixed": fixed,
        "per_layer": per_layer,
        "per_token": per_token,
        "per_token_layer": per_token_layer,
    }


def full_bytes(c: dict[str, float], layers: int, tokens: float) -> float:
    return c["fixed"] + c["per_layer"] * layers + (c["per_token"] + c["per_token_layer"] * layers) * tokens


def table(dtype: torch.dtype) -> list[dict]:
    rows = []
    for preset, label in PRESETS.items():
        cfg = WanConfig.preset(preset)
        plain, ckpt = fit(cfg, dtype, False), fit(cfg, dtype, True)
        tokens = FULL_FRAMES * cfg.tokens_per_frame(*FULL_LATENT)
        for sp in (1, 2, 4, 8):
            local = tokens / sp
            one_block = plain["per_layer"] + plain["per_token_layer"] * local
            rows.append(
                {
                    "preset": label,
                    "sp": sp,
                    "tokens_per_rank": local,
                    "no_checkpointing_gib": full_bytes(plain, cfg.num_layers, local) / GIB,
                    "checkpointing_gib": (full_bytes(ckpt, cfg.num_layers, local) + one_block) / GIB,
                    "per_token_layer_bytes": plain["per_token_layer"],
                    "per_token_layer_bytes_ckpt": ckpt["per_token_layer"],
                }
            )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--sp", type=int, default=1, help="measure per rank under torchrun with this many ranks")
    p.add_argument("--preset", default="wan2.1-t2v-1.3b", help="with --sp: the width measured")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.sp > 1:
        return [measure_sp(args.sp, WanConfig.preset(args.preset), dtype)]
    rows = table(dtype)
    print(f"saved-for-backward activations of one DiT forward, batch 1, {args.dtype}, {FULL_FRAMES} x "
          f"{FULL_LATENT[0]}x{FULL_LATENT[1]} latents; GiB per rank")  # fmt: skip
    print(f"{'model':<6}{'sp':>4}{'tokens/rank':>13}{'no ckpt':>10}{'ckpt':>8}{'B/token/layer':>15}")
    for r in rows:
        print(
            f"{r['preset']:<6}{r['sp']:>4}{r['tokens_per_rank']:>13.0f}{r['no_checkpointing_gib']:>10.2f}"
            f"{r['checkpointing_gib']:>8.2f}{r['per_token_layer_bytes']:>15.0f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


def measure_sp(sp: int, cfg: WanConfig, dtype: torch.dtype) -> dict:
    """Under torchrun: per-rank coefficients with the tokens split over `sp` ranks, next to sp = 1's."""
    from utils.distributed import cleanup, init_distributed
    from utils.sequence_parallel import init_sequence_parallel

    info = init_distributed()
    try:
        comm = init_sequence_parallel(sp, info).comm
        per_rank, whole = fit(cfg, dtype, False, comm), fit(cfg, dtype, False)
        ratio = per_rank["per_token_layer"] / whole["per_token_layer"]
        if info.rank == 0:
            print(f"sp={sp}: per-token-per-layer bytes per rank {per_rank['per_token_layer']:.0f} vs "
                  f"{whole['per_token_layer']:.0f} at sp=1 (ratio {ratio:.3f}; 1/sp = {1 / sp:.3f})")  # fmt: skip
        return {"sp": sp, "per_rank": per_rank, "sp1": whole, "ratio": ratio}
    finally:
        cleanup()


if __name__ == "__main__":
    main()
