"""Encode a folder of videos into Wan VAE latents in LMDB (clean latents for GAN / diffusion / I2V).

Input is DiffSynth-Studio's layout: a metadata file with a ``video`` column (path relative to
``--video_dir``, or absolute) and a ``prompt`` column, as CSV (header row), JSON (a list of objects) or
JSONL (one object per line). Each video becomes one float16 row ``[F, C, h, w]`` in ``<out>/shard_{rank}``
(read back by ``LatentLMDBDataset``) with its prompt, keyed by its metadata path:

1. decode with ffmpeg (imageio-ffmpeg) the first ``1 + (num_frames - 1) * frame_stride`` frames and keep
   every ``frame_stride``-th: ``num_frames`` pixel frames, ``num_frames = 1 + 4k`` for the Wan VAE;
2. scale (bilinear, antialiased) so the frame covers ``height x width``, then centre-crop to it (the
   rule of ``utils/media.py``, which ``inference.py --image/--video`` applies too);
3. map to [-1, 1] and ``WanVAE.encode`` (posterior mean, normalised) -> ``F = 1 + (num_frames - 1) / 4``.

A video that cannot be read (missing, corrupt, too short) is logged, counted and skipped; the job goes
on. Resumable: a restart (or a rerun with a longer metadata file) skips every video already stored.

    python scripts/encode_videos.py --video_dir videos/ --metadata videos/metadata.csv \\
        --out data/latents --vae wan_models/Wan2.1-T2V-1.3B-Diffusers --height 480 --width 832 --num_frames 81
    torchrun --nproc_per_node 8 scripts/encode_videos.py ...                 # one shard per rank
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from scripts._common import DTYPES, check_output, sum_over_ranks, write_manifest
from utils.dataset import shard_indices
from utils.distributed import DistInfo, barrier, distributed_session
from utils.lmdb import LMDBWriter, read_done_keys, shard_path
from utils.logging import setup_logging
from utils.media import MediaReadError, load_clip, read_metadata

logger = logging.getLogger(__name__)


class VideoClips(Dataset):
    """Decodes clips in DataLoader workers; an unreadable video yields its error instead of pixels."""

    def __init__(
        self,
        entries: list[tuple[str, str]],
        root: Path,
        num_frames: int,
        stride: int,
        height: int,
        width: int,
    ):
        self.entries, self.root = entries, root
        self.num_frames, self.stride, self.height, self.width = num_frames, stride, height, width

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        video, prompt = self.entries[i]
        item: dict[str, Any] = {"video": video, "prompt": prompt, "pixels": None, "error": None}
        try:
            item["pixels"] = load_clip(
                self.root / video, self.num_frames, self.stride, self.height, self.width
            )
        except MediaReadError as err:
            item["error"] = str(err)
        return item


# 3. Job ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--video_dir", required=True, help="folder the metadata's video paths are relative to"
    )
    parser.add_argument("--metadata", required=True, help="CSV / JSON / JSONL with 'video' and 'prompt'")
    parser.add_argument("--out", required=True, help="output folder; rank r writes the LMDB <out>/shard_r")
    parser.add_argument(
        "--vae",
        required=True,
        help="a diffusers-format Wan folder (with vae/), Wan's original Wan2.1_VAE.pth, or 'toy'",
    )
    parser.add_argument("--append", action="store_true", help="write into an output made with other settings")
    parser.add_argument("--height", type=int, default=480, help="pixel height after resize + centre crop")
    parser.add_argument("--width", type=int, default=832, help="pixel width after resize + centre crop")
    parser.add_argument("--num_frames", type=int, default=81, help="pixel frames per clip, 1 + 4k for Wan")
    parser.add_argument("--frame_stride", type=int, default=1, help="keep every n-th decoded frame")
    parser.add_argument("--batch_size", type=int, default=1, help="clips per VAE call")
    parser.add_argument("--num_workers", type=int, default=2, help="DataLoader processes decoding videos")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="VAE dtype")
    args = parser.parse_args(argv)
    for name in ("height", "width", "num_frames", "frame_stride", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.num_workers < 0:
        parser.error(f"--num_workers must be >= 0, got {args.num_workers}")
    return args


def _load_vae(path: str, device: torch.device, dtype: torch.dtype):
    from wan.vae import WanVAE  # diffusers is heavy: import when the job really starts

    if path == "toy":  # the toy networks' seeded tiny VAE (z_dim 4), identical to train.py's
        from wan.toy import toy_vae

        return toy_vae().to(device=device, dtype=dtype)
    vae_path = Path(path)
    if vae_path.is_dir():
        return WanVAE.from_diffusers_folder(vae_path, dtype=dtype, device=device)
    if vae_path.is_file():
        return WanVAE.from_original(vae_path, dtype=dtype, device=device)
    raise FileNotFoundError(f"--vae {vae_path}: no such file or folder")


def encode(args: argparse.Namespace, info: DistInfo) -> dict[str, int]:
    """Run this rank's share; returns counts over all ranks: ``written`` rows and ``skipped`` videos."""
    # 1. metadata and the output's consistency with these settings
    entries = read_metadata(args.metadata)
    root = Path(args.video_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--video_dir {root}: no such folder")
    # Rows are keyed by video, so a longer metadata file later just adds work: the manifest holds only
    # what decides a row's content.
    settings = {
        "job": "encode_videos",
        "vae": args.vae,
        "dtype": args.dtype,
        "height": args.height,
        "width": args.width,
        "num_frames": args.num_frames,
        "frame_stride": args.frame_stride,
    }
    out = Path(args.out)
    fresh = check_output(out, settings, args.append)
    done = read_done_keys(out)
    barrier()  # every rank has read the shards before anyone opens one for writing
    if fresh and info.rank == 0:
        write_manifest(out, settings)
    mine = [entries[i] for i in shard_indices(len(entries), info.rank, info.world_size)]
    todo = [e for e in mine if e[0] not in done]
    logger.info(
        "%d videos, %d already in %s; this rank: %d to encode", len(entries), len(done), out, len(todo)
    )

    # 2. VAE and geometry
    vae = _load_vae(args.vae, info.device, DTYPES[args.dtype])
    s, t = vae.spatial_compression, vae.temporal_compression
    if (args.num_frames - 1) % t or args.height % s or args.width % s:
        raise ValueError(
            f"--num_frames {args.num_frames} must be 1 + {t}k and --height {args.height} / --width {args.width} "
            f"multiples of {s} for this VAE"
        )
    row_shape = (1 + (args.num_frames - 1) // t, vae.z_dim, args.height // s, args.width // s)

    # 3. decode in workers, encode and commit one batch at a time
    clips = VideoClips(todo, root, args.num_frames, args.frame_stride, args.height, args.width)
    loader = DataLoader(clips, batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=list)
    written = skipped = 0
    barrier()
    start = time.perf_counter()
    if todo:
        bar = tqdm(
            total=len(todo), desc="encode videos", unit="video", disable=info.rank != 0, dynamic_ncols=True
        )
        with LMDBWriter(shard_path(out, info.rank), append=True, row_shape=row_shape) as writer:
            for batch in loader:
                good = [item for item in batch if item["pixels"] is not None]
                for item in batch:
                    if item["error"] is not None:
                        logger.warning("skipped: %s", item["error"])
                skipped += len(batch) - len(good)
                if good:
                    pixels = torch.stack([item["pixels"] for item in good]).to(info.device)
                    latents = vae.encode(pixels)  # [B, F, C, h, w]
                    writer.write_many(
                        [item["prompt"] for item in good], latents, keys=[item["video"] for item in good]
                    )
                    written += len(good)
                bar.update(len(batch))
        bar.close()

    # 4. totals over all ranks
    written, skipped = sum_over_ranks(written, info.device), sum_over_ranks(skipped, info.device)
    elapsed = max(time.perf_counter() - start, 1e-9)
    logger.info(
        "wrote %d rows of shape %s, skipped %d unreadable videos, on %d rank(s) in %.1f s: %.3f rows/s",
        written, row_shape, skipped, info.world_size, elapsed, written / elapsed,
    )  # fmt: skip
    return {"written": written, "skipped": skipped}


def main(argv: list[str] | None = None) -> dict[str, int]:
    args = parse_args(argv)
    with distributed_session() as info:
        setup_logging(info.rank)
        return encode(args, info)


if __name__ == "__main__":
    main()
