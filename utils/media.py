"""Reading images, videos and metadata files into model-ready pixels (the one resize/crop rule).

Shared by `scripts/encode_videos.py` (training latents) and `inference.py` (`--image`, `--video`), so a
picture conditions the model exactly as the same picture at the start of a training clip did:

1. decode: images with Pillow (any mode -> RGB: alpha dropped, greyscale repeated, first frame of an
   animation), videos with ffmpeg (imageio-ffmpeg), as uint8 `[T, H, W, 3]`;
2. scale (bilinear, antialiased) by the smallest factor that makes the frame cover `height x width`,
   each side rounded to the nearest pixel, then centre-crop to `height x width` (the aspect ratio is
   kept; what does not fit is cut evenly from both sides);
3. map to [-1, 1] (the VAE convention): `x / 127.5 - 1`, layout `[3, T, H, W]` (`WanVAE.encode` input).

Metadata files (DiffSynth-Studio's layout) are CSV with a header row, JSON (a list of objects) or JSONL
(one object per line), with one column naming the file (`video` or `image`) and a `prompt` column.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IMAGE_SUFFIXES",
    "METADATA_SUFFIXES",
    "VIDEO_SUFFIXES",
    "MediaReadError",
    "PromptMedia",
    "TooFewFramesError",
    "is_metadata",
    "load_clip",
    "load_context_frames",
    "load_image",
    "media_for_prompts",
    "media_metadata",
    "read_frames",
    "read_image",
    "read_metadata",
    "resize_center_crop",
    "to_model_pixels",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".mpg", ".mpeg")
METADATA_SUFFIXES = (".csv", ".json", ".jsonl")
SUFFIXES = {"image": IMAGE_SUFFIXES, "video": VIDEO_SUFFIXES}


class MediaReadError(RuntimeError):
    """An image or video could not be turned into frames (unreadable, corrupt or too short)."""


class TooFewFramesError(MediaReadError):
    """A video decodes but has fewer frames than asked for (`available` of `needed`)."""

    def __init__(self, message: str, available: int, needed: int) -> None:
        super().__init__(message)
        self.available = available
        self.needed = needed


# 1. Metadata -----------------------------------------------------------------------------------------


def _records(path: Path, text: str, columns: Sequence[str]) -> list[tuple[int, dict[str, Any]]]:
    """(1-based line or item number, record) pairs of a CSV / JSON / JSONL metadata file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))  # keeps quoted newlines inside a field
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: CSV header {reader.fieldnames} lacks column(s) {missing}")
        return [(reader.line_num, row) for row in reader]
    if suffix == ".jsonl":
        out = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    out.append((number, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}: line {number} is not JSON ({err})") from err
        return out
    if suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON ({err})") from err
        if not isinstance(items, list):
            raise ValueError(
                f"{path}: expected a JSON list of {{{', '.join(columns)}}} objects, got {type(items).__name__}"
            )
        return list(enumerate(items, start=1))
    raise ValueError(f"{path}: unknown metadata format {suffix!r}; use .csv, .json or .jsonl")


def read_metadata(
    path: str | Path, columns: Sequence[str] = ("video", "prompt"), unique: bool = True
) -> list[tuple[str, ...]]:
    """The `columns` of every entry of a metadata file, as tuples of non-empty stripped strings.

    `unique`: keep only the first entry of each value of the first column (a video encoded once);
    without it every entry is kept (one image may condition several prompts).

    Raises:
        ValueError: unreadable file, missing column, empty field, or no entries.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 at byte {err.start}") from err
    entries: list[tuple[str, ...]] = []
    seen: set[str] = set()
    for number, record in _records(path, text, columns):
        if not isinstance(record, dict) or any(not isinstance(record.get(c), str) for c in columns):
            raise ValueError(
                f"{path}: entry {number} must have string fields {tuple(columns)}, got {record!r}"
            )
        values = tuple(record[c].strip() for c in columns)
        if not all(values):
            raise ValueError(f"{path}: entry {number} has an empty {' or '.join(columns)}: {record!r}")
        if unique and values[0] in seen:
            continue
        seen.add(values[0])
        entries.append(values)
    if not entries:
        raise ValueError(f"{path}: no {columns[0]}s listed")
    return entries


def is_metadata(path: str | Path) -> bool:
    """A metadata file (by its suffix) rather than a media file or folder."""
    return Path(path).suffix.lower() in METADATA_SUFFIXES


def media_metadata(path: str | Path, kind: str) -> list[tuple[Path, str]]:
    """`(file, prompt)` of every entry of a metadata file with `kind` ("image" / "video") and `prompt`
    columns, in order (one file may go with several prompts). Relative paths are relative to the
    metadata file's folder.

    Raises:
        ValueError: a problem of the file (see `read_metadata`) or an entry naming no existing file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such metadata file")
    pairs = [
        (path.parent / file, prompt) for file, prompt in read_metadata(path, (kind, "prompt"), unique=False)
    ]
    for number, (file, _) in enumerate(pairs, start=1):
        if not file.is_file():
            raise ValueError(f"{path}: entry {number} names {file}, which is not a file")
    return pairs


def media_for_prompts(source: str | Path, kind: str, num_prompts: int) -> list[Path]:
    """One `kind` file per prompt: `source` itself for every prompt, or the `kind` files of the folder
    `source` (by suffix, sorted by name) paired with the prompts in order, as many as there are prompts.

    Raises:
        ValueError: `source` is missing, or a folder without such files or with another number of them.
    """
    source = Path(source)
    if source.is_file():
        return [source] * num_prompts
    if not source.is_dir():
        raise ValueError(f"{source}: no such file or folder")
    files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES[kind])
    if not files:
        raise ValueError(f"{source}: the folder holds no {kind} files ({' '.join(SUFFIXES[kind])})")
    if len(files) != num_prompts:
        raise ValueError(
            f"{source} holds {len(files)} {kind} files for {num_prompts} prompts: a folder pairs its files "
            "(sorted by name) with the prompts line by line, so the counts must match"
        )
    return files


@dataclass(frozen=True)
class PromptMedia:
    """One video to generate: `prompt` (names the output), `text` (conditions the model: the extended
    prompt when one is given) and `media`, the file whose frames start the video (None: text only)."""

    prompt: str
    text: str
    media: Path | None = None


# 2. Frames -------------------------------------------------------------------------------------------


def read_frames(path: str | Path, count: int, stride: int = 1) -> np.ndarray:
    """Frames `0, stride, ..., (count - 1) * stride` of a video as uint8 `[count, H, W, 3]` (RGB).

    Raises:
        MediaReadError: if ffmpeg cannot decode the file or it has too few frames.
    """
    needed = (count - 1) * stride + 1
    # ffmpeg stops after `needed` frames, so long videos are not decoded to the end.
    reader = imageio_ffmpeg.read_frames(str(path), output_params=["-frames:v", str(needed)])
    frames = []
    try:
        meta = next(reader)
        width, height = meta["size"]
        for raw in reader:
            frames.append(np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3))
    except Exception as err:  # ffmpeg reports every kind of failure as a generic error
        raise MediaReadError(
            f"{path}: cannot decode ({str(err).strip().splitlines()[0] if str(err) else err!r})"
        ) from err
    finally:
        reader.close()
    if len(frames) < needed:
        raise TooFewFramesError(
            f"{path}: has {len(frames)} frames, {needed} needed for {count} frames at stride {stride}",
            len(frames),
            needed,
        )
    return np.stack(frames[::stride][:count])


def read_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 `[1, H, W, 3]` RGB (alpha dropped, greyscale repeated, first frame only).

    Raises:
        MediaReadError: if the file is not an image Pillow can decode.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise MediaReadError(f"{path}: cannot decode as an image ({err})") from err
    return rgb[None]


def resize_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`[T, 3, h, w]` float -> `[T, 3, height, width]`: scale (bilinear, antialiased) by the smallest
    factor that covers the target, each side rounded to the nearest pixel, then centre-crop."""
    h, w = frames.shape[-2:]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        frames = F.interpolate(
            frames, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
        )
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return frames[..., top : top + height, left : left + width]


def to_model_pixels(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 `[T, H, W, 3]` -> float32 `[3, T, height, width]` in [-1, 1], resized and centre-cropped."""
    # np.array copies: decoded frames may be read-only, which torch.from_numpy warns about
    pixels = torch.from_numpy(np.array(frames, dtype=np.uint8)).permute(0, 3, 1, 2).float()
    pixels = resize_center_crop(pixels, height, width)
    return (pixels / 127.5 - 1.0).clamp(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()


def load_clip(path: str | Path, num_frames: int, stride: int, height: int, width: int) -> torch.Tensor:
    """A video's first frames as VAE input `[3, num_frames, height, width]` in [-1, 1] (MediaReadError)."""
    return to_model_pixels(read_frames(path, num_frames, stride), height, width)


def load_image(path: str | Path, height: int, width: int) -> torch.Tensor:
    """An image as VAE input `[3, 1, height, width]` in [-1, 1] (MediaReadError)."""
    return to_model_pixels(read_image(path), height, width)


def load_context_frames(
    path: str | Path, kind: str, latent_frames: int, temporal_compression: int, height: int, width: int
) -> torch.Tensor:
    """The frames that become `latent_frames` latent frames of a VAE with `temporal_compression` t: an
    image (one latent frame), or a video's first `1 + t (latent_frames - 1)` frames, as VAE input
    `[3, T, height, width]` in [-1, 1].

    Raises:
        MediaReadError: unreadable file, or a video too short, with the rule in the message.
    """
    if kind == "image":
        return load_image(path, height, width)
    t, needed = temporal_compression, 1 + temporal_compression * (latent_frames - 1)
    try:
        return load_clip(path, needed, 1, height, width)
    except TooFewFramesError as err:
        raise MediaReadError(
            f"{path}: has {err.available} frames, but {latent_frames} latent frames need its first {needed} "
            f"(1 + {t} x ({latent_frames} - 1): the VAE turns every latent frame after the first into {t} "
            "pixel frames)"
        ) from err
