"""The shapes world's data sets, in the project's own formats: prompt files and clip-latent LMDBs.

Nothing is downloaded: every row is rendered from its attributes and encoded by the world's codec.
"""

from __future__ import annotations

import os
from pathlib import Path

from utils.lmdb import LMDBWriter, shard_path

from .codec import WorldCodec
from .render import START, Clip, Prompt, clips_of, render


def write_prompt_file(path: str | os.PathLike, prompts: list[Prompt]) -> Path:
    """One prompt per line (what `TextDataset` and `scripts/generate_ode_pairs.py` read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(p.text + "\n" for p in prompts), encoding="utf-8")
    tmp.replace(path)
    return path


def clip_key(clip: Clip) -> str:
    """A clip's LMDB key: '<prompt>#<shade>', '@<start>' added when it does not start at the centre."""
    return f"{clip.prompt.text}#{clip.shade}" + (f"@{clip.start}" if clip.start != START else "")


def write_clip_lmdb(
    out: str | os.PathLike, prompts: list[Prompt], num_frames: int, random_start: bool = False
) -> int:
    """Every clip of `prompts` (`clips_of(prompt, random_start)`) as a clean-latent row `[F, 48, 4, 4]`
    keyed by `clip_key` in `<out>/shard_0` (`LatentLMDBDataset`'s layout, as `scripts/encode_videos.py`
    writes real videos). Resumable: rows already present are skipped. Returns the number of rows."""
    codec = WorldCodec()
    with LMDBWriter(shard_path(out, 0), append=True) as writer:
        for prompt in prompts:
            clips = [c for c in clips_of(prompt, random_start) if not writer.contains(clip_key(c))]
            if not clips:
                continue
            videos = [render(c, num_frames).transpose(0, 1)[None] for c in clips]  # [1, 3, F, H, W]
            latents = [codec.encode(v)[0].numpy() for v in videos]
            writer.write_many([prompt.text] * len(clips), latents, keys=[clip_key(c) for c in clips])
        return len(writer)
