"""Generate videos with a trained causal generator, block by block (streaming VAE decode).

    python inference.py --config configs/self_forcing_dmd.yaml --checkpoint checkpoints/self_forcing_dmd.pt \
        --data_path prompts.txt --output_folder videos/ --use_ema [RATE] [--lora adapters/ --lora_scale 1.0]
    torchrun --nproc_per_node 8 inference.py ...        # every prompt generated exactly once
    torchrun --nproc_per_node 8 inference.py ... sp_size=2  # 4 groups of 2 ranks, each splits its videos' tokens

`--checkpoint` takes one of our run directories (or a checkpoint directory inside one), an exported or
upstream Self-Forcing `.pt` (`generator` / `generator_ema`), or official/diffusers safetensors.
`--num_output_frames` counts LATENT frames; past the training length the generator's rolling window
(`model_kwargs.local_attn_size`, `model_kwargs.sink_size`) keeps the KV cache bounded.

Writes `<output_folder>/<index>-<sample>_<slug>.mp4` and `summary.json`: per video and in total the
text-encoding, DiT and VAE-decode seconds, the time to the first decoded frame, per-block latency,
and frames per second counted in PIXEL frames (the mp4's RGB frames, not latent frames) over the
whole prompt-to-last-frame time. One warm-up video runs first and is not counted. The whole pipeline
runs in `--dtype` (bf16 on CUDA by default, as upstream).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from model.build import build_text_encoder, build_vae, lora_spec, make_dit, step_list
from pipeline import CausalInferencePipeline
from utils.checkpoint import read_run_model, select_ema_entry
from utils.config import TrainConfig, load_config
from utils.dataset import TextDataset, shard_indices
from utils.distributed import barrier, distributed_session
from utils.errors import UserError, exit_code_of
from utils.logging import setup_logging, video_to_uint8
from utils.lora import (
    LoraSpec,
    LoraWeights,
    add_lora,
    has_lora,
    load_adapters,
    merge_lora,
    set_adapter_scale,
    split_lora_state_dict,
)
from utils.sequence_parallel import enable_sequence_parallel, init_sequence_parallel
from wan.lora_weights import read_lora
from wan.toy import toy_dit_state_dict
from wan.weights import load_dit_weights, read_dit_weights, strip_wrapper_prefixes

logger = logging.getLogger("inference")


def load_generator_weights(
    cfg: TrainConfig, checkpoint: str | None, use_ema: bool | float
) -> dict[str, torch.Tensor]:
    """Official-key DiT weights of the generator from any supported checkpoint format.

    `use_ema`: False, True (the run's only EMA) or a rate (`--use_ema 0.999`, runs with several).
    A LoRA run's adapters (`lora_rank`/`lora_alpha` of `cfg`) come back merged into the base."""
    if checkpoint is None:
        if cfg.generator_model != "tiny":
            raise UserError("--checkpoint is required unless generator_model is 'tiny' (toy weights)")
        return toy_dit_state_dict(make_dit(cfg, "generator").config)
    path = Path(checkpoint)
    if path.is_dir() and ((path / "checkpoints").is_dir() or (path / "COMPLETE").is_file()):
        generator = read_run_model(path, "generator")
        if use_ema is not False:
            entry = select_ema_entry(path, None if use_ema is True else float(use_ema))
            ema = read_run_model(path, entry)
            generator = {**generator, **ema} if has_lora(generator) else ema
        if not has_lora(generator):
            return strip_wrapper_prefixes(generator)
        base, adapters = split_lora_state_dict(strip_wrapper_prefixes(generator))
        spec = lora_spec(dataclasses.replace(cfg, lora_base_model="generator"), "generator")
        return merge_lora(base, LoraWeights(adapters, alpha=spec.alpha, rank=spec.rank))
    return read_dit_weights(path, key="generator_ema" if use_ema is not False else "generator")


def apply_lora(generator: torch.nn.Module, path: str, scale: float, merge: bool) -> None:
    """Apply the adapters at `path` (any format `wan.lora_weights.read_lora` reads) to the DiT, scaled by
    `scale`: merged into the weights, or as peft layers beside them (the same outputs either way)."""
    lora = read_lora(path)
    if merge:
        generator.load_state_dict(merge_lora(generator.state_dict(), lora, scale))
        return
    spec = LoraSpec(rank=lora.rank, alpha=lora.alpha, target_modules=tuple(lora.modules()))
    add_lora(generator, spec)
    load_adapters(generator, lora, spec)
    set_adapter_scale(generator, scale)


def slug(text: str, limit: int = 40) -> str:
    """File-name-safe short form of a prompt (never the raw prompt: slashes, length)."""
    s = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
    return s[:limit].rstrip("_") or "prompt"


def write_mp4(path: Path, video: torch.Tensor, fps: int) -> None:
    """`video: [T, 3, H, W]` in [-1, 1] -> H.264 mp4."""
    import imageio.v2 as imageio

    imageio.mimwrite(
        path, list(video_to_uint8(video)), fps=fps, codec="libx264", macro_block_size=1, quality=8
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "--config_path", dest="config", required=True)
    p.add_argument("--checkpoint", "--checkpoint_path", dest="checkpoint", default=None)
    p.add_argument(
        "--use_ema",
        nargs="?",
        const=True,
        default=False,
        type=float,
        metavar="RATE",
        help="use the EMA weights (generator_ema); a rate picks one EMA of a run that keeps several",
    )
    p.add_argument("--lora", default=None, help="LoRA adapters to apply (peft folder or LoRA safetensors)")
    p.add_argument("--lora_scale", type=float, default=1.0, help="multiplier of the adapters' update")
    p.add_argument(
        "--lora_unmerged",
        action="store_true",
        help="keep the adapters as separate layers instead of merging them (same video)",
    )
    p.add_argument("--data_path", required=True, help="prompt file, one prompt per line")
    p.add_argument(
        "--extended_prompt_path", default=None, help="aligned file of extended prompts to condition on"
    )
    p.add_argument("--output_folder", required=True)
    p.add_argument(
        "--num_output_frames", type=int, default=None, help="latent frames (default: training length)"
    )
    p.add_argument("--num_samples", type=int, default=1, help="videos per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=int, default=16)
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="dtype of the whole pipeline (generator, text encoder, VAE); auto = bf16 on CUDA, fp32 on CPU",
    )
    p.add_argument(
        "--no_warmup",
        dest="warmup",
        action="store_false",
        help="skip the uncounted warm-up video (it makes the speed figures comparable)",
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_args(argv)


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on an accelerator (upstream casts the whole pipeline to bf16), fp32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type != "cpu" else torch.float32
    return DTYPES[name]


def generate_one(pipe, text_encoder, text: str, noise: torch.Tensor, g: torch.Generator, dtype) -> dict:
    """One video, timed by stage: text encoding, DiT (denoising + cache refresh), VAE decode.

    Returns the pixel frames `[T, 3, H, W]` and the timings; `total_s` is wall time from the prompt
    to the last decoded frame, `first_frame_s` from the prompt to the first decoded block.
    """
    started = time.perf_counter()
    cond = {"prompt_embeds": text_encoder([text])["prompt_embeds"].to(noise.device, dtype)}
    if noise.device.type != "cpu":
        torch.get_device_module(noise.device).synchronize(noise.device)
    text_s = time.perf_counter() - started
    blocks, pixels = [], []
    first_frame_s = None
    for block in pipe.stream(noise, cond, generator=g):
        blocks.append(block)
        if first_frame_s is None:
            first_frame_s = time.perf_counter() - started
        pixels.append(block.frames[0].float().cpu())
    total_s = time.perf_counter() - started
    return {
        "video": torch.cat(pixels, dim=0),
        "text_encode_s": text_s,
        "dit_s": sum(b.dit_s for b in blocks),
        "vae_decode_s": sum(b.decode_s for b in blocks),
        "block_latency_s": [b.latency_s for b in blocks],
        "block_dit_s": [b.dit_s for b in blocks],
        "block_vae_decode_s": [b.decode_s for b in blocks],
        "time_to_first_frame_s": first_frame_s,
        "total_s": total_s,
    }


def summarise(videos: list[dict], warmup: dict | None, info, dtype, args) -> dict:
    """Speed over all counted videos (the warm-up video excluded). FPS counts PIXEL frames: the RGB
    frames of the written mp4 (4 per latent frame after the first, for the Wan VAE), not latent
    frames, over wall time from prompt to last decoded frame (text encoding, DiT, VAE decode)."""
    pixel_frames = sum(v["pixel_frames"] for v in videos)
    total = sum(v["total_s"] for v in videos)
    return {
        "fps_counts": "pixel frames (decoded RGB frames written to the mp4), not latent frames",
        "fps_time": "prompt to last decoded frame: text encoding + DiT + VAE decode",
        "vae_decode_included": True,
        "text_encoding_included": True,
        "warmup_videos": 0 if warmup is None else 1,
        "warmup": warmup,
        "device": str(info.device),
        "dtype": str(dtype),
        "world_size": info.world_size,
        "checkpoint": args.checkpoint,
        "use_ema": args.use_ema,
        "videos_counted": len(videos),
        "pixel_frames": pixel_frames,
        "latent_frames": sum(v["latent_frames"] for v in videos),
        "total_s": total,
        "text_encode_s": sum(v["text_encode_s"] for v in videos),
        "dit_s": sum(v["dit_s"] for v in videos),
        "vae_decode_s": sum(v["vae_decode_s"] for v in videos),
        "fps": pixel_frames / total,
        "median_fps": statistics.median(v["fps"] for v in videos),
        "median_time_to_first_frame_s": statistics.median(v["time_to_first_frame_s"] for v in videos),
        "median_first_block_latency_s": statistics.median(v["first_block_latency_s"] for v in videos),
        "median_block_latency_s": statistics.median(
            x for v in videos for x in v["block_latency_s"][1:] or v["block_latency_s"]
        ),
        "videos": videos,
    }


@torch.no_grad()
def run(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    with distributed_session() as info:
        setup_logging(info.rank)
        # sp_size ranks generate each video together (sequence parallelism); groups split the prompts
        parallel = init_sequence_parallel(cfg.sp_size, info)
        out_dir = Path(args.output_folder)
        if info.rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
        dtype = pick_dtype(args.dtype, info.device)
        # 1. networks, all in `dtype`: generator (full copy per rank: inference needs no sharding),
        #    text encoder, VAE
        generator = make_dit(cfg, "generator")
        load_dit_weights(generator.model, load_generator_weights(cfg, args.checkpoint, args.use_ema))
        if args.lora is not None:
            apply_lora(generator.model, args.lora, args.lora_scale, merge=not args.lora_unmerged)
        generator = generator.to(info.device, dtype).eval().requires_grad_(False)
        enable_sequence_parallel(generator.model, parallel, "generator_model")
        text_encoder = build_text_encoder(cfg, info.device, dtype).to(dtype)
        vae = build_vae(cfg, info.device, dtype).to(info.device, dtype)
        f_train, c, h, w = cfg.latent_shape
        frames = args.num_output_frames or f_train
        pipe = CausalInferencePipeline(
            generator,
            generator.scheduler,
            [s for s in step_list(cfg) if s > 0],
            cfg.num_frame_per_block,
            independent_first_frame=cfg.independent_first_frame,
            context_noise=cfg.context_noise,
            vae=vae,
            num_max_frames=frames,
        )
        # 2. prompts: each sequence-parallel group (each rank when sp_size=1) takes every dp_size-th
        #    prompt; none dropped, none repeated
        try:
            prompts = TextDataset(args.data_path, args.extended_prompt_path)
        except (OSError, ValueError) as err:
            raise UserError(f"--data_path {args.data_path}: {err}") from err
        mine = shard_indices(len(prompts), parallel.dp_rank, parallel.dp_size)

        def text_of(idx: int) -> str:
            item = prompts[idx]
            return item.get("extended_prompts") or item["prompts"]

        def noise_for(idx: int, k: int) -> tuple[torch.Tensor, torch.Generator]:
            # noise depends on (seed, prompt, sample) only: the same video at any world size
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + idx * 1009 + k)
            return torch.randn(1, frames, c, h, w, generator=g).to(info.device, dtype), g

        # 3. one warm-up video (kernels, allocator, caches), timed but not counted or written
        warmup = None
        if args.warmup and mine:
            noise, g = noise_for(mine[0], 0)
            out = generate_one(pipe, text_encoder, text_of(mine[0]), noise, g, dtype)
            warmup = {"index": mine[0], "total_s": out["total_s"]}
        records = []
        bar = None
        if info.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=len(prompts) * args.num_samples, desc="videos", dynamic_ncols=True)
        for idx in mine:
            for k in range(args.num_samples):
                noise, g = noise_for(idx, k)
                out = generate_one(pipe, text_encoder, text_of(idx), noise, g, dtype)
                video = out.pop("video")
                name = f"{idx:05d}-{k}_{slug(prompts[idx]['prompts'])}.mp4"
                if not parallel.sp_leader:  # the group's other ranks made the same video
                    continue
                write_mp4(out_dir / name, video, args.fps)
                records.append(
                    {
                        "index": idx,
                        "sample": k,
                        "prompt": prompts[idx]["prompts"],
                        "file": name,
                        "latent_frames": frames,
                        "pixel_frames": int(video.shape[0]),
                        **out,
                        "first_block_latency_s": out["block_latency_s"][0],
                        "fps": video.shape[0] / out["total_s"],
                    }
                )
                if bar is not None:
                    bar.update(parallel.dp_size)
        if bar is not None:
            bar.close()
        # 4. one summary for all ranks
        gathered = [(records, warmup)]
        if info.world_size > 1:
            gathered = [None] * info.world_size
            torch.distributed.all_gather_object(
                gathered, (records, warmup) if parallel.sp_leader else ([], None)
            )
        if info.rank == 0:
            videos = sorted(
                (r for part, _ in gathered for r in part), key=lambda r: (r["index"], r["sample"])
            )
            summary = summarise(videos, gathered[0][1], info, dtype, args)
            summary["sp_size"] = parallel.sp_size  # ranks per video
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            logger.info(
                "%d videos; %.1f pixel frames/s (text encoding, DiT and VAE decode included), median "
                "time to first frame %.3fs",
                len(videos),
                summary["fps"],
                summary["median_time_to_first_frame_s"],
            )
        barrier()


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 a user error (one message, rank 0); anything else keeps its traceback."""
    args = parse_args(argv)
    return exit_code_of(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
