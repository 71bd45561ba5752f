"""The exact measure of image-to-video and video continuation in the shapes world.

Given the first frames of a real clip, its continuation is fully determined: the frames show the
shade, colour, shape and position; the prompt (or, from two frames on, the frames themselves) gives
direction and speed; the world renders every clip at any length (`world.render`). So a continuation
is judged frame by frame against the truth:

* **continuation accuracy**: the share of samples whose every generated frame is within RMSE
  `CONTINUATION_RMSE` (0.1, pixels in [-1, 1]; the evaluator's precision threshold) of the same frame
  of the true clip;
* **shade kept**: the share of samples whose generated frames show the given frames' background shade
  (majority over the frames of the per-frame decoded shade). A model that ignores the given frames
  picks one of the 3 shades: 1/3 by chance.

Long continuations are judged per segment of `segment_frames` GENERATED frames (the first starts at
the first generated frame; the last may be shorter), as the evaluator's per-segment tables. The given
frames themselves are only checked (`context_rmse`: how far the video's first frames are from the
clip's, 0 when the pipeline put them back unchanged through a lossless codec).

Layout: videos `[N, F, 3, H, W]` in [-1, 1]; `num_context_frames` K < F given frames at the start.
This module is a pure function of its inputs (no model, no files).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import Tensor

from world.render import SHADES, SIZE, Clip, render

__all__ = ["CONTINUATION_RMSE", "Continuation", "context_frames", "evaluate_continuation"]

CONTINUATION_RMSE = 0.1  # a generated frame is "right" when its RMSE to the true frame is below this

# Background greys in pixel units ([-1, 1]), one RGB row per shade.
_GREYS = torch.tensor(SHADES).view(-1, 1).expand(-1, 3) * 2.0 - 1.0


def context_frames(clips: Sequence[Clip], num_frames: int) -> Tensor:
    """The first `num_frames` frames of each real clip, `[N, num_frames, 3, H, W]`: what a model is given."""
    return torch.stack([_truth(c, num_frames) for c in clips])


@lru_cache(maxsize=512)
def _truth(clip: Clip, num_frames: int) -> Tensor:
    return render(clip, num_frames)  # cached: rendering is the slow part (callers never mutate it)


def _decoded_shades(videos: Tensor) -> Tensor:
    """`[N, F]` shade index of every frame: the per-channel median colour (the object covers at most
    25 of 256 pixels, so the median is the background) snapped to the nearest grey."""
    median = videos.flatten(-2).median(-1).values  # [N, F, 3]
    return torch.cdist(median.flatten(0, 1), _GREYS).argmin(-1).view(videos.shape[:2])


@dataclass(frozen=True)
class Continuation:
    """Per-frame measurements of N continuations; summaries over any window of generated frames.

    Attributes:
        clips: the real clip each video continues.
        num_context_frames: K, the given frames at the start of every video.
        segment_frames: generated frames per segment.
        frame_rmse: `[N, F]` RMSE of every frame to the same frame of its clip.
        frame_shade: `[N, F]` decoded background shade (index into `SHADES`) of every frame.
    """

    clips: list[Clip]
    num_context_frames: int
    segment_frames: int
    frame_rmse: Tensor = field(repr=False)
    frame_shade: Tensor = field(repr=False)

    @property
    def num_frames(self) -> int:
        return self.frame_rmse.shape[1]

    def accurate(self, start: int, stop: int) -> Tensor:
        """`[N]` bool: every frame in `[start, stop)` is within `CONTINUATION_RMSE` of the truth."""
        return (self.frame_rmse[:, start:stop] < CONTINUATION_RMSE).all(1)

    def shade_kept(self, start: int, stop: int) -> Tensor:
        """`[N]` bool: the majority shade of frames `[start, stop)` is the clip's (ties: the lower index)."""
        counts = torch.nn.functional.one_hot(self.frame_shade[:, start:stop], len(SHADES)).sum(1)
        given = torch.tensor([c.shade for c in self.clips])
        return counts.argmax(1) == given

    def window(self, start: int, stop: int) -> dict[str, float | int]:
        """Means over samples for the generated frames `[start, stop)` (absolute frame indices)."""
        if not self.num_context_frames <= start < stop <= self.num_frames:
            raise ValueError(
                f"window [{start}, {stop}) must lie within the generated frames "
                f"[{self.num_context_frames}, {self.num_frames})"
            )
        rmse = self.frame_rmse[:, start:stop]
        return {
            "start": start,
            "stop": stop,
            "accuracy": self.accurate(start, stop).double().mean().item(),
            "shade_kept": self.shade_kept(start, stop).double().mean().item(),
            "rmse": rmse.square().mean(1).sqrt().mean().item(),  # per-sample RMSE over the window, averaged
            "worst_frame_rmse": rmse.max(1).values.mean().item(),  # per sample, averaged
        }

    def summary(self) -> dict[str, float | int]:
        """All generated frames together, plus `context_rmse` (the largest RMSE of a given frame)."""
        out = self.window(self.num_context_frames, self.num_frames)
        out["context_rmse"] = self.frame_rmse[:, : self.num_context_frames].max().item()
        return out

    def segments(self) -> list[tuple[int, int]]:
        """`(start, stop)` of each segment of `segment_frames` generated frames (the last may be shorter)."""
        starts = range(self.num_context_frames, self.num_frames, self.segment_frames)
        return [(s, min(s + self.segment_frames, self.num_frames)) for s in starts]

    def per_segment(self) -> list[dict[str, float | int]]:
        return [self.window(start, stop) for start, stop in self.segments()]


def evaluate_continuation(
    videos: Tensor, clips: Sequence[Clip], num_context_frames: int, segment_frames: int = 12
) -> Continuation:
    """Judge continuations `videos: [N, F, 3, H, W]` (pixels in [-1, 1]) of the real `clips`, of which
    each video was given the first `num_context_frames` frames (and the prompt `clips[i].prompt`)."""
    _check(videos, clips, num_context_frames, segment_frames)
    videos = videos.detach().to("cpu", torch.float32)
    truth = torch.stack([_truth(c, videos.shape[1]) for c in clips])  # [N, F, 3, H, W]
    frame_rmse = (videos - truth).square().mean((-1, -2, -3)).sqrt()
    return Continuation(list(clips), num_context_frames, segment_frames, frame_rmse, _decoded_shades(videos))


def _check(videos: Tensor, clips: Sequence[Clip], num_context_frames: int, segment_frames: int) -> None:
    if not isinstance(videos, Tensor) or videos.dim() != 5 or tuple(videos.shape[2:]) != (3, SIZE, SIZE):
        shape = tuple(videos.shape) if isinstance(videos, Tensor) else type(videos).__name__
        raise ValueError(f"evaluate_continuation: videos must be [N, F, 3, {SIZE}, {SIZE}], got {shape}")
    n, f = videos.shape[:2]
    if n == 0 or len(clips) != n:
        raise ValueError(
            f"evaluate_continuation: {n} videos but {len(clips)} clips (one real clip per video)"
        )
    bad = [i for i, c in enumerate(clips) if not isinstance(c, Clip)]
    if bad:
        raise ValueError(
            f"evaluate_continuation: clips[{bad[0]}] is a {type(clips[bad[0]]).__name__}, not a Clip"
        )
    if not 1 <= num_context_frames < f:
        raise ValueError(
            f"evaluate_continuation: num_context_frames={num_context_frames} must leave generated frames "
            f"in videos of {f} frames (1 <= K < F)"
        )
    if segment_frames < 1:
        raise ValueError(f"evaluate_continuation: segment_frames must be >= 1, got {segment_frames}")
    if not torch.isfinite(videos).all():
        raise ValueError("evaluate_continuation: videos contain NaN or infinite pixels")
