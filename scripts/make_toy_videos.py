"""Write a folder of small synthetic videos plus `metadata.csv`, the "real videos" of the toy-network runs.

    python scripts/make_toy_videos.py --out data/toy_videos --num_videos 8

Each clip shows a few coloured squares moving along straight lines over a gradient background
(deterministic per index), encoded as H.264 mp4 with imageio-ffmpeg; the metadata file has the
`video` and `prompt` columns that `scripts/encode_videos.py` reads (prompts from a prompt file).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np


def toy_clip(index: int, frames: int, size: int) -> np.ndarray:
    """`uint8 [T, size, size, 3]`: moving squares, seeded by `index`."""
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([xx, yy, 1 - xx], axis=-1) * rng.uniform(60, 160, size=3)
    video = np.repeat(base[None], frames, axis=0)
    side = size // 5
    for _ in range(3):
        start = rng.uniform(0, size - side, size=2)
        velocity = rng.uniform(-2.0, 2.0, size=2)
        colour = rng.uniform(0, 255, size=3)
        for t in range(frames):
            y, x = ((start + velocity * t) % (size - side)).astype(int)
            video[t, y : y + side, x : x + side] = colour
    return video.clip(0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (videos + metadata.csv)")
    p.add_argument("--num_videos", type=int, default=8)
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--size", type=int, default=64, help="square frame size in pixels")
    p.add_argument("--fps", type=int, default=16)
    p.add_argument(
        "--prompts", default=str(Path(__file__).resolve().parents[1] / "configs" / "prompts_toy.txt")
    )
    args = p.parse_args(argv)
    import imageio.v2 as imageio

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = [
        line.strip() for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    if not prompts:
        raise ValueError(f"{args.prompts}: no prompts")
    with open(out / "metadata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "prompt"])
        for i in range(args.num_videos):
            name = f"toy_{i:04d}.mp4"
            imageio.mimwrite(
                out / name, list(toy_clip(i, args.frames, args.size)), fps=args.fps, codec="libx264"
            )
            writer.writerow([name, prompts[i % len(prompts)]])
    print(f"wrote {args.num_videos} videos and {out / 'metadata.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
