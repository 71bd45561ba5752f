"""Activation memory of one Wan DiT forward + backward per rank at sp = 1, 2, 4, (6,) 8, from counted bytes.

    python scripts/activation_memory.py                              # 1.3B and 14B, bf16: the table
    torchrun --nproc_per_node 2 scripts/activation_memory.py --sp 2  # per rank with real collectives

What is counted: the bytes autograd keeps for backward during the forward (every tensor the forward
saves, once per storage, parameters excluded), recorded by a saved-tensor hook, for the bidirectional
DiT (teacher / critic; the causal training path keeps the same tensors per block) at the preset's
width (dim, FFN, heads, 512 x 4096 text), batch 1. The forward runs on fake tensors (shapes and dtypes,
no data: the 14B costs nothing on a CPU); a real forward saves exactly the same bytes (`--check_fake`,
and a test). Counts at 1 and 2 layers and two token counts give the per-token activation size:

    bytes(layers, tokens) = fixed + per_layer * layers + (per_token + per_token_layer * layers) * tokens

(`per_layer`: the text keys/values each block keeps; `per_token`: embeddings, RoPE factors, head),
checked on a fifth count (3 layers over 3 frames); the table evaluates it at the preset's layers and
32760 tokens (81 frames at 480x832: 21 latent frames x 1560 tokens).

Per rank under sequence parallelism the same counts run with the shapes of rank 0 of an `sp` group
(`ShapeComm`: collectives that return tensors of the right shapes): every per-token tensor of a block
is a shard (token-sharded, or the whole sequence for `heads / sp` heads after the all-to-all), plus one
copy a single process does not keep (self-attention's output, saved by attention in the head layout and
by the output projection in the token layout); the text keys/values and the RoPE factors are whole.
`--sp N` under torchrun counts with real collectives and prints both (a test checks they are equal).

Without gradient checkpointing the peak is the saved bytes; with it each block keeps its input and
backward recomputes one block at a time, so the peak is the checkpointed bytes plus one block's.
Not counted: weights, gradients, optimizer states, one kernel's transient buffers, allocator slack.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from wan import WanConfig, WanModel
from wan.modules import ROPE_TABLES

GIB = 2**30
PRESETS = {"wan2.1-t2v-1.3b": "1.3B", "wan2.1-t2v-14b": "14B"}
FULL_FRAMES, FULL_LATENT = 21, (60, 104)  # 81 frames at 480x832 -> 21 x 1560 = 32760 tokens
SP_SIZES = (1, 2, 4, 6, 8)  # 6: the 1.3B's 12 heads do not split over 8
# Counted grids: 1 and 2 frames of 8x12 latents (24 tokens each: no padding at any sp in SP_SIZES, as
# none at 1560 tokens per frame); saved bytes are linear in the tokens.
SMALL_LATENT, SMALL_FRAMES = (8, 12), (1, 2)


class ShapeComm:
    """Rank 0 of a sequence-parallel group of `size`, for counting: the collectives return tensors of
    the shapes real ones return (new storages, differentiable), without any other process. Every rank
    of a group whose frames split evenly saves the same shapes; `--sp` checks the counts against real
    collectives under torchrun."""

    def __init__(self, size: int) -> None:
        self.size, self.rank = size, 0

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x] * self.size)


def saved_bytes(fn, exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn()` runs (not in `exclude`)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in exclude:  # the storage itself: views of one tensor count once
            seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def count(
    cfg: WanConfig,
    layers: int,
    frames: int,
    latent_hw: tuple[int, int],
    dtype: torch.dtype,
    checkpointing: bool,
    fake: bool = True,
    comm=None,
) -> int:
    """Saved bytes of one forward of a `layers`-deep DiT of `cfg`'s width over `frames` latent frames."""
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    default = torch.get_default_dtype()
    try:
        with mode:
            torch.set_default_dtype(dtype)  # build in `dtype` (a fake module cannot be converted)
            model = WanModel(cfg.replace(num_layers=layers))
            torch.set_default_dtype(default)
            model.enable_gradient_checkpointing(checkpointing)
            model.enable_sequence_parallel(comm)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(1, cfg.in_dim, frames, *latent_hw, generator=g, dtype=dtype)
            context = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g, dtype=dtype)
            t = torch.full((1,), 500.0, dtype=torch.float32)
            params = {p.untyped_storage()._cdata for p in model.parameters()}
            return saved_bytes(lambda: model(x, t, context), params)
    finally:
        torch.set_default_dtype(default)
        ROPE_TABLES.clear()  # no fake RoPE factors left behind for real calls


def fit(cfg: WanConfig, dtype: torch.dtype, checkpointing: bool, fake: bool = True, comm=None) -> dict:
    """The four coefficients from counts at 1 and 2 layers and two token counts (exact for this form)."""
    n1, n2 = (f * cfg.tokens_per_frame(*SMALL_LATENT) for f in SMALL_FRAMES)
    m = {
        (lay, n): count(cfg, lay, f, SMALL_LATENT, dtype, checkpointing, fake, comm)
        for lay in (1, 2)
        for n, f in zip((n1, n2), SMALL_FRAMES, strict=True)
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


def evaluate(c: dict, layers: int, tokens: float) -> float:
    return c["fixed"] + c["per_layer"] * layers + (c["per_token"] + c["per_token_layer"] * layers) * tokens


def table(dtype: torch.dtype) -> list[dict]:
    rows = []
    for preset, label in PRESETS.items():
        cfg = WanConfig.preset(preset)
        plain = fit(cfg, dtype, False)
        tokens = FULL_FRAMES * cfg.tokens_per_frame(*FULL_LATENT)
        # The form must also hold off the points it was fitted on: 3 layers over 3 frames.
        direct = count(cfg, 3, 3, SMALL_LATENT, dtype, False)
        predicted = evaluate(plain, 3, 3 * cfg.tokens_per_frame(*SMALL_LATENT))
        if abs(direct - predicted) > 1e-9 * direct:
            raise RuntimeError(
                f"{label}: the linear form predicts {predicted:.0f} B, 3 layers save {direct} B"
            )
        for sp in SP_SIZES:
            if cfg.num_heads % sp:  # Ulysses splits whole heads
                rows.append({"preset": label, "layers": cfg.num_layers, "sp": sp, "heads": cfg.num_heads})
                continue
            # Per-rank coefficients, still per token of the whole video: counted with this rank's shapes.
            comm = ShapeComm(sp) if sp > 1 else None
            rank, rank_ckpt = fit(cfg, dtype, False, comm=comm), fit(cfg, dtype, True, comm=comm)
            one_block = rank["per_layer"] + rank["per_token_layer"] * tokens
            rows.append(
                {
                    "preset": label,
                    "layers": cfg.num_layers,
                    "sp": sp,
                    "tokens_per_rank": tokens / sp,
                    "no_checkpointing_gib": evaluate(rank, cfg.num_layers, tokens) / GIB,
                    "checkpointing_gib": (evaluate(rank_ckpt, cfg.num_layers, tokens) + one_block) / GIB,
                    "per_token_layer_bytes": rank["per_token_layer"],
                    "per_token_layer_bytes_checkpointed": rank_ckpt["per_token_layer"],
                }
            )
    return rows


def print_table(rows: list[dict], dtype_name: str) -> None:
    print(
        f"saved-for-backward activations of one DiT forward, batch 1, {dtype_name}, {FULL_FRAMES} latent "
        f"frames of {FULL_LATENT[0]}x{FULL_LATENT[1]}; GiB per rank"
    )
    print(
        f"{'model':<6}{'sp':>4}{'tokens/rank':>13}{'no ckpt':>10}{'ckpt':>8}{'B/token/layer':>15}{'(ckpt)':>8}"
    )
    for r in rows:
        if "heads" in r:
            print(f"{r['preset']:<6}{r['sp']:>4}  n/a: {r['heads']} heads do not split over {r['sp']} ranks")
            continue
        print(
            f"{r['preset']:<6}{r['sp']:>4}{r['tokens_per_rank']:>13.0f}{r['no_checkpointing_gib']:>10.2f}"
            f"{r['checkpointing_gib']:>8.2f}{r['per_token_layer_bytes']:>15.0f}"
            f"{r['per_token_layer_bytes_checkpointed']:>8.0f}"
        )


def measure_sp(sp: int, cfg: WanConfig, dtype: torch.dtype) -> dict:
    """Under torchrun: per-rank coefficients on real tensors with the tokens split over `sp` ranks,
    next to those `ShapeComm` gives (the table's) and the one-process ones."""
    from utils.distributed import cleanup, init_distributed
    from utils.sequence_parallel import init_sequence_parallel

    info = init_distributed()
    try:
        comm = init_sequence_parallel(sp, info).comm
        per_rank = fit(cfg, dtype, False, fake=False, comm=comm)
        counted = fit(cfg, dtype, False, comm=ShapeComm(sp))
        whole = fit(cfg, dtype, False, fake=False)
        ratio = per_rank["per_token_layer"] / whole["per_token_layer"]
        if info.rank == 0:
            print(
                f"sp={sp}, {cfg.dim}-wide DiT, real collectives: per-token-per-layer bytes per rank "
                f"{per_rank['per_token_layer']:.0f} (shape-only count {counted['per_token_layer']:.0f}) vs "
                f"{whole['per_token_layer']:.0f} in one process (ratio {ratio:.3f}, 1/sp = {1 / sp:.3f}); "
                f"per layer {per_rank['per_layer']:.0f} vs {whole['per_layer']:.0f}"
            )
        return {"sp": sp, "per_rank": per_rank, "counted": counted, "one_process": whole, "ratio": ratio}
    finally:
        cleanup()


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--sp", type=int, default=1, help="count per rank under torchrun with this many ranks")
    p.add_argument("--preset", default="wan2.1-t2v-1.3b", help="the width --sp and --check_fake use")
    p.add_argument("--check_fake", action="store_true", help="real and fake forwards save the same bytes")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = WanConfig.preset(args.preset)
    if args.sp > 1:
        return [measure_sp(args.sp, cfg, dtype)]
    if args.check_fake:
        real, fake = fit(cfg, dtype, False, fake=False), fit(cfg, dtype, False)
        print(f"{args.preset}: real {real}\n{' ' * len(args.preset)}  fake {fake}")
        if real != fake:
            raise SystemExit("real and fake forwards save different bytes")
        return [real]
    rows = table(dtype)
    print_table(rows, args.dtype)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
