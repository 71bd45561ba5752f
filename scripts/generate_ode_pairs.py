"""Generate ODE-regression pairs with the bidirectional teacher, straight into LMDB (spec §7.2).

For every prompt the teacher integrates the probability-flow ODE from Gaussian noise with CFG and the
states at ``--keep_indices`` are stored as one float16 row ``[K+1, F, C, H, W]`` (noise -> clean) in
``<out>/shard_{rank}``, read back by ``ODERegressionLMDBDataset``. Defaults are upstream's: 48 Euler
steps on the shift-8 grid, guidance 6 with Wan's negative prompt, kept states [0, 12, 24, 36, -1]
(t = 1000, 960, 888.9, 727.3, 0), latents 21 x 16 x 60 x 104 (81 frames of 480x832).

Sizes are LATENT sizes (``--latent_frames``, ``--latent_height``, ``--latent_width``); channels come
from the model preset. The job is resumable: rows are committed per batch with their prompt, a restart
skips every prompt already stored (by any rank of any earlier run), and prompt ``i`` (its 0-based
position among the non-blank lines of the prompt file) always gets the noise seeded by ``(seed, i)``,
so an interrupted-and-resumed job writes exactly the rows of an uninterrupted one. Duplicate prompts
are generated once (rows are keyed by prompt, as upstream's LMDB builder dedups them); rerunning with
lines added to the prompt file generates only the new prompts. ``<out>/job.json`` records the settings
that decide a row's content (teacher, sampler, seed, shapes); an output made with other settings, or
an LMDB written by another job, is refused unless ``--append`` is given.

    python scripts/generate_ode_pairs.py --prompts prompts.txt --out data/ode_lmdb \\
        --weights wan_models/Wan2.1-T2V-1.3B --text_encoder wan_models/Wan2.1-T2V-1.3B-Diffusers
    torchrun --nproc_per_node 8 scripts/generate_ode_pairs.py ...           # one shard per rank
    python scripts/generate_ode_pairs.py --prompts p.txt --out /tmp/ode --model tiny \\
        --hashed_text_embeddings --latent_frames 3 --latent_height 8 --latent_width 8   # CPU demo
    python scripts/generate_ode_pairs.py --prompts configs/prompts_toy.txt --out data/toy_ode \\
        --model tiny --weights toy --text_encoder toy --latent_frames 6 --latent_height 8 \\
        --latent_width 8 --num_steps 8 --keep_indices 0 2 4 6 -1          # the toy networks' ODE pairs
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.bidirectional_inference import BidirectionalSampler
from scripts._common import (
    DTYPES,
    WAN_NEGATIVE_PROMPT,
    add_teacher_args,
    add_text_encoder_args,
    build_prompt_encoder,
    build_teacher,
    check_output,
    model_preset,
    sum_over_ranks,
    write_manifest,
)
from utils.dataset import TextDataset, shard_indices
from utils.distributed import DistInfo, barrier, distributed_session
from utils.lmdb import LMDBWriter, read_done_keys, shard_path
from utils.logging import setup_logging

logger = logging.getLogger(__name__)

DEFAULT_KEEP_INDICES = (0, 12, 24, 36, -1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", required=True, help="UTF-8 text file, one prompt per line")
    parser.add_argument("--out", required=True, help="output folder; rank r writes the LMDB <out>/shard_r")
    parser.add_argument(
        "--append",
        action="store_true",
        help="write into an output that holds a dataset made with other settings (or by another job)",
    )
    parser.add_argument("--seed", type=int, default=0, help="noise seed (prompt i uses (seed, i))")
    parser.add_argument("--batch_size", type=int, default=1, help="prompts per sampler call")
    parser.add_argument(
        "--samples_per_prompt",
        type=int,
        default=1,
        help="rows per prompt (different noise); row k of prompt i is keyed '<prompt>#k' when > 1",
    )
    sampler = parser.add_argument_group("sampler")
    sampler.add_argument("--solver", choices=("euler", "unipc"), default="euler")
    sampler.add_argument("--num_steps", type=int, default=48)
    sampler.add_argument("--shift", type=float, default=8.0)
    sampler.add_argument("--guidance_scale", type=float, default=6.0, help="CFG v_u + g (v_c - v_u)")
    sampler.add_argument(
        "--keep_indices",
        type=int,
        nargs="+",
        default=list(DEFAULT_KEEP_INDICES),
        help="ODE states stored per row, among the num_steps + 1 states (-1 = final clean latent)",
    )
    sampler.add_argument(
        "--negative_prompt", default=WAN_NEGATIVE_PROMPT, help="default: Wan's negative prompt"
    )
    shape = parser.add_argument_group("latent shape (latent units; pixels = 1 + 4(F-1) frames of 8H x 8W)")
    shape.add_argument("--latent_frames", type=int, default=21)
    shape.add_argument("--latent_height", type=int, default=60)
    shape.add_argument("--latent_width", type=int, default=104)
    add_teacher_args(parser)
    add_text_encoder_args(parser)
    args = parser.parse_args(argv)
    if args.hashed_text_embeddings == (args.text_encoder is not None):
        parser.error("pass exactly one of --text_encoder PATH and --hashed_text_embeddings")
    for name in (
        "batch_size",
        "num_steps",
        "latent_frames",
        "latent_height",
        "latent_width",
        "samples_per_prompt",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def prompt_noise(seed: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Noise ``shape`` (float32, CPU) for prompt ``index``: independent of rank, batch and device.

    The generator seed is ``np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]``,
    a well-mixed 64-bit seed per (seed, index) pair, so nearby seeds do not share prompts' noise.
    """
    state = int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])
    return torch.randn(shape, generator=torch.Generator().manual_seed(state))


def _unique_prompts(dataset: TextDataset) -> tuple[list[str], list[int]]:
    """First occurrence of every prompt and its index in ``dataset`` (rows are keyed by prompt)."""
    seen: set[str] = set()
    prompts, indices = [], []
    for i, prompt in enumerate(dataset.prompts):
        if prompt not in seen:
            seen.add(prompt)
            prompts.append(prompt)
            indices.append(i)
    if len(prompts) < len(dataset):
        logger.warning(
            "%s: %d duplicate prompts are generated once", dataset.path, len(dataset) - len(prompts)
        )
    return prompts, indices


def generate(args: argparse.Namespace, info: DistInfo) -> int:
    """Run this rank's share of the job; returns the number of rows written by all ranks."""
    # 1. prompts, sampler settings, and the output's consistency with them
    dataset = TextDataset(args.prompts)
    prompts, prompt_ids = _unique_prompts(dataset)
    cfg = model_preset(args.model)
    latent_shape = (args.latent_frames, cfg.in_dim, args.latent_height, args.latent_width)
    cfg.tokens_per_frame(args.latent_height, args.latent_width)  # raises if not patch-divisible
    n_states = args.num_steps + 1
    bad = [i for i in args.keep_indices if not -n_states <= i < n_states]
    if bad:
        raise ValueError(f"--keep_indices {bad} out of range for {args.num_steps} steps ({n_states} states)")
    keep = [i % n_states for i in args.keep_indices]
    if any(b <= a for a, b in zip(keep, keep[1:])):
        raise ValueError(f"--keep_indices must be increasing (noise -> clean), got {args.keep_indices}")
    row_shape = (len(keep), *latent_shape)
    # Rows are keyed by prompt, so a longer prompt file later just adds work: the manifest holds only
    # what decides a row's content.
    settings = {
        "job": "generate_ode_pairs",
        "model": args.model,
        "weights": args.weights,
        "dtype": args.dtype,
        "text_encoder": "hashed" if args.hashed_text_embeddings else args.text_encoder,
        "negative_prompt": args.negative_prompt,
        "seed": args.seed,
        "solver": args.solver,
        "num_steps": args.num_steps,
        "shift": args.shift,
        "guidance_scale": args.guidance_scale,
        "keep_indices": keep,
        "row_shape": list(row_shape),
    }
    per_prompt = args.samples_per_prompt
    if per_prompt > 1:  # absent when 1, so outputs of earlier versions still resume
        settings["samples_per_prompt"] = per_prompt
    out = Path(args.out)
    fresh = check_output(out, settings, args.append)
    done = read_done_keys(out)
    # Every rank has read the shards; only now may anyone create or open one for writing.
    barrier()
    if fresh and info.rank == 0:
        write_manifest(out, settings)

    # One unit of work per (prompt, sample): its key, and the noise index that seeds it.
    units = [
        (prompts[i] if per_prompt == 1 else f"{prompts[i]}#{k}", i, prompt_ids[i] * per_prompt + k)
        for i in range(len(prompts))
        for k in range(per_prompt)
    ]
    mine = shard_indices(len(units), info.rank, info.world_size)
    todo = [units[u] for u in mine if units[u][0] not in done]
    logger.info(
        "%d prompts (%d unique), %d already in %s; this rank: %d to generate, rows %s",
        len(dataset), len(prompts), len(done & {u[0] for u in units}), out, len(todo), row_shape,
    )  # fmt: skip

    # 2. models
    teacher = build_teacher(args.model, args.weights, args.seed, info.device, DTYPES[args.dtype])
    sampler = BidirectionalSampler(teacher, args.shift, args.num_steps, args.guidance_scale, args.solver)
    logger.info("kept states at t = %s", [round(float(t), 2) for t in sampler.timesteps()[keep]])
    encode = build_prompt_encoder(args, cfg, info.device)
    uncond = encode([args.negative_prompt]) if args.guidance_scale != 1.0 else None

    # 3. generation: one committed batch of rows per sampler call
    written = 0
    barrier()  # time the generation alone, from a common start
    start = time.perf_counter()
    if todo:
        bar = tqdm(
            total=len(todo), desc="ode pairs", unit="prompt", disable=info.rank != 0, dynamic_ncols=True
        )
        with LMDBWriter(shard_path(out, info.rank), append=True, row_shape=row_shape) as writer:
            for first in range(0, len(todo), args.batch_size):
                batch = todo[first : first + args.batch_size]
                batch_prompts = [prompts[i] for _, i, _ in batch]
                noise = torch.stack([prompt_noise(args.seed, n, latent_shape) for _, _, n in batch])
                result = sampler.sample(
                    noise.to(info.device), encode(batch_prompts), uncond, record_indices=keep
                )
                writer.write_many(batch_prompts, result.trajectory, keys=[key for key, _, _ in batch])
                written += len(batch)
                bar.update(len(batch))
        bar.close()

    # 4. throughput over all ranks (the job ends when its slowest rank does)
    total = sum_over_ranks(written, info.device)
    elapsed = max(time.perf_counter() - start, 1e-9)
    logger.info(
        "wrote %d rows on %d rank(s) in %.1f s: %.3f rows/s (%.3f rows/s per rank)",
        total, info.world_size, elapsed, total / elapsed, total / elapsed / info.world_size,
    )  # fmt: skip
    return total


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with distributed_session() as info:
        setup_logging(info.rank)
        return generate(args, info)


if __name__ == "__main__":
    main()
