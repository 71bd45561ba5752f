"""Rank-aware logging: a rank-0 filter for `logging`, metrics as JSON lines, sample videos, wandb.

Rank 0 writes everything; other ranks only emit warnings and errors (prefixed with their rank) and
write no files. wandb is optional and imported lazily; credentials come only from the environment
(`WANDB_API_KEY`, `WANDB_BASE_URL`), never from a config file.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

# Evenly spaced frames in the PNG contact strip: enough to see motion, small enough to open.
STRIP_FRAMES = 8


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(rank: int, level: int = logging.INFO) -> None:
    """Configure the root logger: rank 0 logs at `level`, other ranks only warnings and errors."""
    handler = logging.StreamHandler()
    handler.addFilter(_RankFilter(rank))
    handler.setFormatter(
        logging.Formatter("[rank%(rank)d %(asctime)s %(levelname)s %(name)s] %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if any(isinstance(f, _RankFilter) for f in h.filters)]:
        root.removeHandler(old)  # calling twice must not duplicate lines
    root.addHandler(handler)
    root.setLevel(level)


@dataclass
class WandbSettings:
    """What `wandb.init` gets. `mode`: "offline" (default), "online" or "disabled"."""

    mode: str = "offline"
    project: str | None = None
    entity: str | None = None
    name: str | None = None
    config: dict[str, Any] | None = None


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric tensors must hold one value, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan" / "inf" / "-inf": keeps the file strict JSON
    return value


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:80] or "sample"


def video_to_uint8(video: torch.Tensor) -> np.ndarray:
    """`video: [T, 3, H, W]` in [-1, 1] -> `uint8 [T, H, W, 3]` (values outside are clipped)."""
    if video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"video must be [T, 3, H, W], got shape {tuple(video.shape)}")
    frames = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(0, 2, 3, 1).cpu().numpy()


class MetricsLogger:
    """Rank 0 appends `{"step", "time", **metrics}` lines to `<run_dir>/metrics.jsonl`, saves sample
    videos to `<run_dir>/samples/` and mirrors both to wandb when `wandb_cfg.mode != "disabled"`.
    On other ranks every method is a no-op.
    """

    def __init__(self, run_dir: str | Path, rank: int, wandb_cfg: WandbSettings | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.active = rank == 0
        self._wandb = None
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._file = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":
            import wandb  # lazy: only runs that use it pay the import

            self._wandb = wandb.init(
                mode=wandb_cfg.mode,
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                name=wandb_cfg.name,
                config=wandb_cfg.config,
                dir=str(self.run_dir),
            )

    def truncate_after(self, step: int) -> None:
        """Drop the rows of steps after `step` (a resumed run redoes them) and any torn last line,
        so that metrics.jsonl holds every step once, with the values of the run that kept it."""
        if not self.active:
            return
        self._file.close()
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                row_step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a kill mid-write
            if row_step <= step:
                kept.append(line + "\n")
        tmp = self.metrics_path.with_name(self.metrics_path.name + ".partial")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(self.metrics_path)
        self._file = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record scalar metrics (floats, ints or one-element tensors) for `step`."""
        if not self.active:
            return
        record = {"step": int(step), "time": time.time()}
        record.update({k: _to_jsonable(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k not in ("step", "time")}, step=int(step))

    def log_video(self, step: int, name: str, video: torch.Tensor, fps: int = 16) -> Path | None:
        """Save `video: [T, 3, H, W]` in [-1, 1] as `samples/<name>_step<step>.mp4` plus a PNG strip.

        Odd heights/widths are padded by one edge row/column (H.264 with yuv420p needs even sizes).
        Returns the mp4 path on rank 0, None elsewhere.
        """
        if not self.active:
            return None
        import imageio.v2 as imageio

        frames = video_to_uint8(video)
        pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
        if pad_h or pad_w:
            frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        out_dir = self.run_dir / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{_safe_name(name)}_step{int(step):08d}"
        mp4 = out_dir / f"{stem}.mp4"
        imageio.mimwrite(mp4, list(frames), fps=fps, codec="libx264", macro_block_size=1, quality=8)
        picks = np.linspace(0, len(frames) - 1, num=min(STRIP_FRAMES, len(frames))).round().astype(int)
        imageio.imwrite(out_dir / f"{stem}.png", np.concatenate(list(frames[picks]), axis=1))
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Video(str(mp4), format="mp4")}, step=int(step))
        return mp4

    def close(self) -> None:
        if not self.active:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
