"""Generate videos with a trained causal generator, block by block (streaming VAE decode).

    python inference.py --config configs/self_forcing_dmd.yaml --checkpoint checkpoints/self_forcing_dmd.pt \
        --data_path prompts.txt --output_folder videos/ --use_ema [RATE] [--lora adapters/ --lora_scale 1.0]
    torchrun --nproc_per_node 8 inference.py ...        # every prompt generated exactly once
    torchrun --nproc_per_node 8 inference.py ... sp_size=2  # 4 groups of 2 ranks, each splits its videos' tokens

`--checkpoint` takes one of our run directories (or a checkpoint directory inside one), an exported or
upstream Self-Forcing `.pt` (`generator` / `generator_ema`), or official/diffusers safetensors.
`--num_output_frames` counts LATENT frames, the given ones included; past the training length the
generator's rolling window (`model_kwargs.local_attn_size`, `model_kwargs.sink_size`) keeps the KV
cache bounded.

Given frames (image-to-video, video continuation):

    python inference.py ... --image cat.png --data_path prompts.txt     # one image for every prompt
    python inference.py ... --image images/ --data_path prompts.txt     # sorted images, prompt by prompt
    python inference.py ... --image pairs.csv                           # `image` + `prompt` columns
    python inference.py ... --video clip.mp4 --num_context_frames 3 --data_path prompts.txt

The frames are scaled (bilinear, antialiased) to cover the config's pixel size (latent size x the
VAE's spatial compression), centre-cropped to it (`utils/media.py`, the rule `encode_videos.py` applies
to training videos), encoded with the run's VAE (the world codec for world configs), and cached as
clean context at t = 0 block by block, exactly as the training rollout caches `initial_latent`; the
model then generates the rest. `--video` reads the first `1 + t (K - 1)` frames for K latent frames
(t: the VAE's temporal compression, 4 for Wan, 1 for the world). An image is one latent frame.
Metadata paths are relative to the metadata file's folder. The mp4 starts with the given frames
(decoded back through the VAE, so "unchanged up to the codec").

Writes `<output_folder>/<index>-<sample>_<slug>.mp4` and `summary.json`: per video and in total the
text-encoding, DiT and VAE-decode seconds, the time to the first decoded frame, per-block latency,
and frames per second counted in PIXEL frames (the mp4's RGB frames, not latent frames) over the
whole prompt-to-last-frame time (with given frames: only the generated frames count, while their
encoding, caching and decoding, `context_*_s`, count in the time). One warm-up video runs first and is
not counted. The whole pipeline runs in `--dtype` (bf16 on CUDA by default, as upstream).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model.build import build_text_encoder, build_vae, lora_spec, make_dit
from pipeline.common import plan_blocks
from pipeline.from_config import inference_pipeline
from utils.checkpoint import read_run_model, select_ema_entry
from utils.config import TrainConfig, load_config
from utils.dataset import TextDataset, shard_indices
from utils.distributed import barrier, distributed_session, raise_user_error_everywhere
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
from utils.media import (
    MediaReadError,
    PromptMedia,
    is_metadata,
    load_context_frames,
    media_for_prompts,
    media_metadata,
)
from utils.sequence_parallel import enable_sequence_parallel, init_sequence_parallel
from wan.lora_weights import read_lora
from wan.toy import toy_dit_state_dict
from wan.weights import WeightLoadError, load_dit_weights, read_dit_weights, strip_wrapper_prefixes

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


def load_generator(
    model: torch.nn.Module, cfg: TrainConfig, checkpoint: str | None, use_ema: bool | float
) -> None:
    """`load_generator_weights` into `model`; a file that cannot be read or does not fit is one
    `UserError` naming `--checkpoint` (a traceback is for bugs, not for a wrong path)."""
    try:
        load_dit_weights(model, load_generator_weights(cfg, checkpoint, use_ema))
    except (WeightLoadError, OSError) as err:
        message = str(err) if not isinstance(err, OSError) or err.strerror is None else f"{err.strerror}"
        if checkpoint is not None and not message.startswith(checkpoint):
            message = f"{checkpoint}: {message}"
        raise UserError(f"--checkpoint {message}") from err


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


# ------------------------------------------------------------------------------------- given frames


@dataclass(frozen=True)
class ContextLayout:
    """How every video starts: `kind` ("image" / "video", None for text-to-video), its `latent_frames`
    K of `total_frames` latent frames, read through a VAE of `temporal_compression`."""

    kind: str | None
    latent_frames: int
    total_frames: int
    temporal_compression: int

    @property
    def flag(self) -> str:
        return f"--{self.kind}"


def context_source(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """("image" / "video", the path given), or (None, None) for text-to-video; the flags must agree."""
    if args.image is not None and args.video is not None:
        raise UserError("--image and --video exclude each other: give the first frames one way")
    if args.video is not None and args.num_context_frames is None:
        raise UserError("--video needs --num_context_frames K: how many latent frames of it to continue from")
    if args.num_context_frames is not None and args.video is None:
        raise UserError("--num_context_frames counts latent frames of --video; it needs --video")
    if args.image is not None:
        return "image", args.image
    if args.video is not None:
        return "video", args.video
    return None, None


def read_jobs(args: argparse.Namespace) -> list[PromptMedia]:
    """Every video to generate, in index order: `--data_path` prompts with `--image` / `--video` (one file
    for every prompt, or a folder's files one per prompt; `utils.media.media_for_prompts`), or prompts
    and files together from a metadata file (`utils.media.media_metadata`)."""
    kind, source = context_source(args)
    flag = f"--{kind}"
    if source is not None and is_metadata(source):
        if args.data_path is not None or args.extended_prompt_path is not None:
            raise UserError(
                f"{flag} {source} is a metadata file with the prompts: leave out --data_path and "
                "--extended_prompt_path"
            )
        try:
            return [PromptMedia(prompt, prompt, file) for file, prompt in media_metadata(source, kind)]
        except (OSError, ValueError) as err:
            raise UserError(f"{flag} {err}") from err
    if args.data_path is None:
        raise UserError("--data_path (a prompt file) is required unless --image / --video is a metadata file")
    try:
        prompts = TextDataset(args.data_path, args.extended_prompt_path)
    except (OSError, ValueError) as err:
        raise UserError(f"--data_path {args.data_path}: {err}") from err
    files = [None] * len(prompts)
    if source is not None:
        try:
            files = media_for_prompts(source, kind, len(prompts))
        except (OSError, ValueError) as err:
            raise UserError(f"{flag} {err}") from err
    texts = prompts.extended_prompts or prompts.prompts
    return [PromptMedia(p, t, f) for p, t, f in zip(prompts.prompts, texts, files, strict=True)]


def context_layout(args: argparse.Namespace, cfg: TrainConfig, temporal_compression: int) -> ContextLayout:
    """Check that K given latent frames and `--num_output_frames` fit the model's block layout: the given
    frames are cached as blocks (`[N, ...]`, or the first frame alone then `[N, ...]`) and the rest is
    generated in blocks of N (`pipeline.common.plan_blocks` is the rule)."""
    kind, _ = context_source(args)
    total = args.num_output_frames or cfg.latent_shape[0]
    k = {None: 0, "image": 1, "video": args.num_context_frames}[kind]
    n, iff = cfg.num_frame_per_block, cfg.independent_first_frame
    if kind is not None:
        if k < 1:
            raise UserError(f"--num_context_frames must be >= 1, got {k}")
        if total <= k:
            raise UserError(f"--num_output_frames {total} must exceed the {k} given latent frame(s)")
        try:
            plan_blocks(k, n, n, iff)  # a valid generated part: only the given part can fail here
        except ValueError:
            allowed = f"1 + k*{n}" if iff else f"k*{n} or 1 + k*{n}"
            raise UserError(
                f"--num_context_frames {k}: the given latent frames are cached block by block, so with "
                f"num_frame_per_block={n} (independent_first_frame={iff}) they must number {allowed}"
            ) from None
        try:
            plan_blocks(k, total - k, n, iff)
        except ValueError:
            fits = k + math.ceil((total - k) / n) * n
            raise UserError(
                f"--num_output_frames {total}: after the {k} given latent frame(s) the {total - k} frames "
                f"to generate must be a multiple of num_frame_per_block={n} (e.g. --num_output_frames {fits})"
            ) from None
    return ContextLayout(kind, k, total, temporal_compression)


def load_context(path: Path, layout: ContextLayout, height: int, width: int) -> torch.Tensor:
    """The given frames in `path` as VAE input `[3, T, height, width]` in [-1, 1] (`utils/media.py`)."""
    try:
        return load_context_frames(
            path, layout.kind, layout.latent_frames, layout.temporal_compression, height, width
        )
    except MediaReadError as err:
        raise UserError(f"{layout.flag} {err}") from err


def check_contexts(
    jobs: list[PromptMedia], mine: list[int], layout: ContextLayout, height: int, width: int
) -> None:
    """Read every given file of this rank once before generating, so a bad one stops the run before
    any video is written; a problem on any rank is one error on every rank."""
    error = None
    try:
        for path in dict.fromkeys(jobs[i].media for i in mine if jobs[i].media is not None):
            load_context(path, layout, height, width)
    except UserError as err:
        error = err
    raise_user_error_everywhere(error)


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
    p.add_argument(
        "--data_path",
        default=None,
        help="prompt file, one prompt per line (not needed when --image / --video is a metadata file)",
    )
    p.add_argument(
        "--image",
        default=None,
        help="image-to-video: an image (for every prompt), a folder of images (sorted, one per prompt "
        "line) or a CSV/JSON/JSONL metadata file with `image` and `prompt` columns",
    )
    p.add_argument(
        "--video",
        default=None,
        help="continue videos: a video file, a folder of videos or a metadata file with `video` and "
        "`prompt` columns (as --image)",
    )
    p.add_argument(
        "--num_context_frames",
        type=int,
        default=None,
        help="with --video: latent frames of it to continue from (its first 1 + t(K-1) pixel frames, "
        "t = the VAE's temporal compression)",
    )
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


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":  # accelerators run asynchronously: time the work, not its launch
        torch.get_device_module(device).synchronize(device)


def generate_one(
    pipe,
    text_encoder,
    text: str,
    noise: torch.Tensor,
    g: torch.Generator,
    dtype,
    context: torch.Tensor | None = None,
) -> dict:
    """One video, timed by stage: text encoding, DiT (denoising + cache refresh), VAE decode.

    `context`: given frames `[3, T, H, W]` in [-1, 1]; they are encoded with the pipeline's VAE, cached
    as clean context and come first in the video (decoded back through the VAE).
    Returns the pixel frames `[T, 3, H, W]` and the timings; `total_s` is wall time from the prompt
    to the last decoded frame, `time_to_first_frame_s` from the prompt to the first GENERATED block.
    The given frames' encoding, caching (DiT) and decoding are `context_{encode,cache,decode}_s`, kept
    out of the per-block lists (they are not generated) but inside `total_s`.
    """
    started = time.perf_counter()
    cond = {"prompt_embeds": text_encoder([text])["prompt_embeds"].to(noise.device, dtype)}
    _synchronize(noise.device)
    text_s = time.perf_counter() - started
    initial = None
    if context is not None:
        initial = pipe.vae.encode(context[None].to(noise.device, dtype))  # [1, K, C, h, w]
        _synchronize(noise.device)
    encode_s = time.perf_counter() - started - text_s
    blocks, pixels = [], []
    first_frame_s = None
    given = {"context_pixel_frames": 0, "context_cache_s": 0.0, "context_decode_s": 0.0}
    for block in pipe.stream(noise, cond, initial_latent=initial, generator=g):
        pixels.append(block.frames[0].float().cpu())
        if initial is not None and block.start_frame < initial.shape[1]:  # the given frames
            given = {
                "context_pixel_frames": block.frames.shape[1],
                "context_cache_s": block.dit_s,
                "context_decode_s": block.decode_s,
            }
            continue
        blocks.append(block)
        if first_frame_s is None:
            first_frame_s = time.perf_counter() - started
    total_s = time.perf_counter() - started
    return {
        "video": torch.cat(pixels, dim=0),
        "text_encode_s": text_s,
        "context_encode_s": encode_s,
        **given,
        "dit_s": sum(b.dit_s for b in blocks),
        "vae_decode_s": sum(b.decode_s for b in blocks),
        "block_latency_s": [b.latency_s for b in blocks],
        "block_dit_s": [b.dit_s for b in blocks],
        "block_vae_decode_s": [b.decode_s for b in blocks],
        "time_to_first_frame_s": first_frame_s,
        "total_s": total_s,
    }


def summarise(videos: list[dict], warmup: dict | None, info, dtype, args) -> dict:
    """Speed over all counted videos (the warm-up video excluded). FPS counts generated PIXEL frames:
    the RGB frames of the written mp4 (4 per latent frame after the first, for the Wan VAE) less the
    given ones of --image / --video, not latent frames, over wall time from prompt to last decoded
    frame (text encoding, DiT, VAE decode; with given frames also their encoding and caching)."""
    pixel_frames = sum(v["pixel_frames"] for v in videos)
    generated = sum(v["generated_pixel_frames"] for v in videos)
    total = sum(v["total_s"] for v in videos)
    return {
        "fps_counts": "generated pixel frames (decoded RGB frames written to the mp4, less the given "
        "frames of --image / --video), not latent frames",
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
        "generated_pixel_frames": generated,
        "latent_frames": sum(v["latent_frames"] for v in videos),
        "total_s": total,
        "text_encode_s": sum(v["text_encode_s"] for v in videos),
        "dit_s": sum(v["dit_s"] for v in videos),
        "vae_decode_s": sum(v["vae_decode_s"] for v in videos),
        "fps": generated / total,
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
        # 1. what to generate, checked before anything heavy: prompts, given files, block layout.
        #    sp_size ranks generate each video together (sequence parallelism); each group (each rank
        #    when sp_size=1) takes every dp_size-th video; none dropped, none repeated.
        jobs = read_jobs(args)
        parallel = init_sequence_parallel(cfg.sp_size, info)
        mine = shard_indices(len(jobs), parallel.dp_rank, parallel.dp_size)
        out_dir = Path(args.output_folder)
        if info.rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
        dtype = pick_dtype(args.dtype, info.device)
        # 2. networks, all in `dtype`: VAE (first: the given frames are read at its geometry),
        #    generator (full copy per rank: inference needs no sharding), text encoder
        vae = build_vae(cfg, info.device, dtype).to(info.device, dtype)
        layout = context_layout(args, cfg, vae.temporal_compression)
        _, c, h, w = cfg.latent_shape
        height, width = h * vae.spatial_compression, w * vae.spatial_compression
        check_contexts(jobs, mine, layout, height, width)
        generator = make_dit(cfg, "generator")
        load_generator(generator.model, cfg, args.checkpoint, args.use_ema)
        if args.lora is not None:
            apply_lora(generator.model, args.lora, args.lora_scale, merge=not args.lora_unmerged)
        generator = generator.to(info.device, dtype).eval().requires_grad_(False)
        enable_sequence_parallel(generator.model, parallel, "generator_model")
        text_encoder = build_text_encoder(cfg, info.device, dtype).to(dtype)
        pipe = inference_pipeline(cfg, generator, vae, num_max_frames=layout.total_frames)

        def make_one(idx: int, k: int) -> dict:
            # noise depends on (seed, prompt, sample) only: the same video at any world size
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + idx * 1009 + k)
            shape = (1, layout.total_frames - layout.latent_frames, c, h, w)
            noise = torch.randn(shape, generator=g).to(info.device, dtype)
            job = jobs[idx]
            context = None if job.media is None else load_context(job.media, layout, height, width)
            return generate_one(pipe, text_encoder, job.text, noise, g, dtype, context)

        # 3. one warm-up video (kernels, allocator, caches), timed but not counted or written
        warmup = None
        if args.warmup and mine:
            warmup = {"index": mine[0], "total_s": make_one(mine[0], 0)["total_s"]}
        records = []
        bar = None
        if info.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=len(jobs) * args.num_samples, desc="videos", dynamic_ncols=True)
        for idx in mine:
            for k in range(args.num_samples):
                out = make_one(idx, k)
                video = out.pop("video")
                name = f"{idx:05d}-{k}_{slug(jobs[idx].prompt)}.mp4"
                if not parallel.sp_leader:  # the group's other ranks made the same video
                    continue
                write_mp4(out_dir / name, video, args.fps)
                generated = int(video.shape[0]) - out["context_pixel_frames"]
                records.append(
                    {
                        "index": idx,
                        "sample": k,
                        "prompt": jobs[idx].prompt,
                        "file": name,
                        "context": None if jobs[idx].media is None else str(jobs[idx].media),
                        "context_latent_frames": layout.latent_frames,
                        "latent_frames": layout.total_frames,
                        "pixel_frames": int(video.shape[0]),
                        "generated_pixel_frames": generated,
                        **out,
                        "first_block_latency_s": out["block_latency_s"][0],
                        "fps": generated / out["total_s"],
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
                "%d videos; %.1f generated pixel frames/s (text encoding, DiT and VAE decode included), "
                "median time to first frame %.3fs",
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
