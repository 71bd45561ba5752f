"""Trainable parameters and optimizer memory of full vs LoRA DMD, by arithmetic on the meta device.

    python scripts/lora_memory.py --preset wan2.1-t2v-1.3b --lora_rank 64

DMD trains two DiTs of the preset: the causal generator and the critic (fake score). Per trainable
parameter AdamW keeps `exp_avg` and `exp_avg_sq` in fp32 (8 bytes), the fp32 gradient takes 4 and each
EMA of the generator 4. Nothing is allocated: the networks are built on the meta device.
"""

from __future__ import annotations

import argparse

import torch

from utils.lora import DEFAULT_TARGET_MODULES, LoraSpec, add_lora
from wan import CausalWanModel, WanConfig, WanModel

GIB = 2**30


def trainable(preset: str, lora_rank: int | None, targets: tuple[str, ...]) -> tuple[int, int]:
    """(generator, critic) trainable parameter counts; LoRA on both when `lora_rank` is given."""
    cfg = WanConfig.preset(preset)
    counts = []
    for build in (lambda: CausalWanModel(cfg, num_frame_per_block=3), lambda: WanModel(cfg)):
        with torch.device("meta"):
            model = build()
            if lora_rank is not None:
                add_lora(model, LoraSpec(rank=lora_rank, alpha=float(lora_rank), target_modules=targets))
        counts.append(sum(p.numel() for p in model.parameters() if p.requires_grad))
    return counts[0], counts[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan2.1-t2v-1.3b")
    p.add_argument("--lora_rank", type=int, default=64)
    p.add_argument("--lora_target_modules", default=",".join(DEFAULT_TARGET_MODULES))
    args = p.parse_args()
    targets = tuple(t.strip() for t in args.lora_target_modules.split(",") if t.strip())
    print(f"preset={args.preset} (generator + critic), AdamW fp32 state, fp32 grads, one fp32 EMA")
    print(f"{'mode':<14}{'trainable':>16}{'AdamW state':>14}{'grads':>10}{'EMA':>10}")
    for name, rank in (("full", None), (f"LoRA r={args.lora_rank}", args.lora_rank)):
        gen, critic = trainable(args.preset, rank, targets)
        n = gen + critic
        print(f"{name:<14}{n:>16,}{8 * n / GIB:>12.2f}Gi{4 * n / GIB:>8.2f}Gi{4 * gen / GIB:>8.2f}Gi")


if __name__ == "__main__":
    main()
