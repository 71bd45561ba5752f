"""Exact evaluation of shapes-world videos from their pixels.

Every clip of the world is a pure function of its attributes (`world.render`), so a generated video
can be judged exactly: which colour, shape, direction and speed its object has, whether it is one
coherent object throughout, how far it is from the nearest real clip of its prompt, and which
background shades a prompt's samples cover compared with the data (uniform over the 3 shades).

Beside those strict pass/fail judgements, graded scores rank methods that are not yet perfect:
which frames are coherent (per frame, so sharpness can be followed through a rollout), and how far
the object's centre is from the true path of the asked prompt (trajectory error, in pixels).
Every rate in a summary comes with a 95% confidence interval (`world.stats`).

Decoding is written for imperfect samples (blurred edges, stray pixels, a drifting object), so every
decision is a nearest-neighbour or best-fit choice against the world's own definitions, with
thresholds derived from the palette and the motion rules rather than tuned numbers.

Layout: videos `[N, F, 3, H, W]`, pixels in [-1, 1] (the VAE convention, as `render()` returns).
Long rollouts are judged per `segment_frames`-long segment against the world's clip rendered at the
full length: the world continues exactly past the training length (bounces included).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from world.render import (
    COLOURS,
    DIRECTIONS,
    SHADES,
    SHAPES,
    SIZE,
    SPEEDS,
    Prompt,
    clips_of,
    object_mask,
    render,
    starts,
    trajectory,
)
from world.stats import mean_interval, wilson_interval, with_interval

# Palette in pixel units ([-1, 1]): object colours [4, 3] and background greys [3, 3].
_COLOUR_NAMES = tuple(COLOURS)
_PALETTE = torch.tensor([COLOURS[c] for c in _COLOUR_NAMES]) * 2.0 - 1.0
_BACKGROUNDS = torch.tensor(SHADES).view(-1, 1).expand(-1, 3) * 2.0 - 1.0

# A pixel belongs to the object when it is farther from its frame's background colour than half the
# smallest object-to-background distance of the palette: a pure object pixel is at least that full
# distance away, a pure background pixel at 0, so the midpoint tolerates equal error on either side.
OBJECT_THRESHOLD = 0.5 * float(torch.cdist(_PALETTE, _BACKGROUNDS).min())

# Footprint sizes of the world's objects, in SHAPES order (square 25 px, circle 21 px). In a coherent
# frame the object's size is within SIZE_TOLERANCE of the footprint of the *decoded* shape: half the
# square-circle gap, so a blurred edge pixel or two is forgiven but a circle drawn with a
# square-sized blob (or a merged pair, or a fragment) is not.
FOOTPRINT_SIZES = tuple(int(object_mask(s, SIZE // 2, SIZE // 2).sum()) for s in SHAPES)
SIZE_TOLERANCE = (max(FOOTPRINT_SIZES) - min(FOOTPRINT_SIZES)) // 2

# An object never moves more than the fastest speed between frames (a bounce only shortens the
# step); one extra pixel absorbs centroid jitter of imperfect footprints. Larger jumps = teleports.
# Across frames without an object the allowance grows by the fastest speed per frame elapsed.
MAX_SPEED = max(SPEEDS.values())
JUMP_SLACK = 1

# Components smaller than this are specks, not objects: a quarter of the smaller footprint (5 px),
# so a few stray pixels from sampling noise do not count as a second object, while any fragment
# big enough to read as a shape does (a second object, or one split in two, stays incoherent).
MIN_OBJECT_PIXELS = min(FOOTPRINT_SIZES) // 4

# A (direction, speed) hypothesis explains the motion only if the decoded centres lie within one
# pixel of its trajectory on average, i.e. within one frame of slow motion. Otherwise the motion is
# decoded as None (e.g. an object that stops has neither a direction nor a speed).
FIT_TOLERANCE = 1.0

# A sample is "precise" when every attribute is right AND its nearest real clip is closer than this
# (RMSE). RMSE alone is not enough: a green circle asked for as a green square is 0.086 from the
# square's clip, while a right clip shifted by one pixel is ~0.18 away.
PRECISION_RMSE = 0.1

# Trajectory error of a frame without an object: the frame's diagonal, (SIZE - 1) * sqrt(2) = 21.2 px.
# A decoded centre lies in the frame and the true one inside [LOW, HIGH], so no misplaced object is
# that far: the mean stays finite and a missing object always counts worse than a misplaced one.
MISSING_DISTANCE = (SIZE - 1) * 2**0.5

_MOTIONS = tuple((d, s) for d in DIRECTIONS for s in SPEEDS)


def _hypotheses(random_start: bool) -> tuple[tuple[str, str, int], ...]:
    """(direction, speed, start) of every path an object can follow in the world."""
    return tuple((d, s, p) for d, s in _MOTIONS for p in starts(random_start))


# The scalar keys of a summary (and `shade_counts`), in table order. Every scalar key also has
# `<key>_ci`: [lo, hi], its 95% interval; `coherence_by_frame` (+ `_ci`) holds one rate per frame.
SUMMARY_KEYS = (
    "colour",
    "shape",
    "direction",
    "speed",
    "all_attributes",
    "coherence",
    "frame_coherence",
    "trajectory_error",
    "precision",
    "rmse",
    "shades_hit",
    "all_shades_hit",
    "shade_tv",
    "shade_counts",
)


@dataclass(frozen=True)
class SampleResult:
    """What one video (or one segment of it) shows, and how it compares with its prompt."""

    prompt: Prompt
    colour: str | None  # None: no object pixels at all
    shape: str | None
    direction: str | None  # None: no hypothesis fits within FIT_TOLERANCE
    speed: str | None
    shade: int  # majority decoded background shade (index into SHADES)
    fit_error: float  # mean distance (px) of the centres from the best hypothesis' trajectory
    colour_correct: bool
    shape_correct: bool
    direction_correct: bool
    speed_correct: bool
    all_attributes: bool
    coherent: bool  # every frame coherent
    frame_coherent: tuple[bool, ...]  # per frame: one object, sized like the decoded shape, no teleport
    trajectory_error: float  # mean px from the asked prompt's path (MISSING_DISTANCE without an object)
    nearest_shade: int  # the nearest real clip's shade (index into SHADES)
    rmse: float  # RMSE (pixels in [-1, 1]) to that clip
    precise: bool  # all attributes right and rmse < PRECISION_RMSE


@dataclass(frozen=True)
class _Frames:
    """Per-frame decodings of a batch, from which any window of frames is judged."""

    shade: Tensor  # [N, F] nearest SHADES index of the frame's median colour
    components: Tensor  # [N, F] number of connected components of object pixels
    size: Tensor  # [N, F] pixels in the largest component (the object); 0 when there is none
    centre: Tensor  # [N, F, 2] (y, x) centroid of the object; NaN when there is none
    colour_sum: Tensor  # [N, F, 3] sum of the object's pixel colours
    overlap: Tensor  # [N, F, len(SHAPES)] IoU of the object with each shape's footprint at its centre
    fit: Tensor  # [N, len(hypotheses), F] distance of the centre from each hypothesis' position
    asked: Tensor  # [N, len(starts)] the hypotheses of the asked prompt's motion, one per start
    mse: Tensor  # [N, K, F] mean squared pixel error to each real clip of the prompt (clips_of order)
    hypotheses: tuple[tuple[str, str, int], ...]
    num_starts: int


def summarise(results: Sequence[SampleResult]) -> dict[str, float | list]:
    """Means over samples with their 95% intervals (`<key>_ci`), the coherence rate of every frame
    index, and shade coverage per prompt (from each sample's nearest real clip).

    Samples are independent draws (`world.stats`): a pass/fail rate gets the Wilson interval over
    the samples; a mean of per-sample shares in [0, 1] (frame coherence; per-prompt shade coverage)
    the Wilson interval over the samples (prompts), conservative for such shares; a continuous mean
    (RMSE, trajectory error, shade TV) the normal-approximation interval. Frames of one video are
    not independent, so no interval counts frames as draws.
    """
    if not results:
        raise ValueError("summarise: no samples to summarise")
    lengths = {len(r.frame_coherent) for r in results}
    if len(lengths) > 1:
        raise ValueError(
            f"summarise: samples of different lengths {sorted(lengths)} cannot share per-frame rates"
        )
    out: dict[str, float | list] = {}

    def rate(key: str, values: Sequence[float]) -> None:  # values in [0, 1], one per independent draw
        out[key] = math.fsum(values) / len(values)
        out[f"{key}_ci"] = list(wilson_interval(out[key], len(values)))

    def mean(key: str, values: Sequence[float]) -> None:
        out[key] = math.fsum(values) / len(values)
        out[f"{key}_ci"] = list(mean_interval(values))

    for key, field_name in (
        ("colour", "colour_correct"),
        ("shape", "shape_correct"),
        ("direction", "direction_correct"),
        ("speed", "speed_correct"),
        ("all_attributes", "all_attributes"),
        ("coherence", "coherent"),
    ):
        rate(key, [float(getattr(r, field_name)) for r in results])
    frames = torch.tensor([r.frame_coherent for r in results], dtype=torch.float64)  # [N, F]
    rate("frame_coherence", frames.mean(1).tolist())
    mean("trajectory_error", [r.trajectory_error for r in results])
    rate("precision", [float(r.precise) for r in results])
    mean("rmse", [r.rmse for r in results])

    by_prompt: dict[Prompt, list[int]] = {}
    for r in results:
        by_prompt.setdefault(r.prompt, []).append(r.nearest_shade)
    num_shades = len(SHADES)
    hit, tv = [], []
    for shades in by_prompt.values():
        freq = torch.bincount(torch.tensor(shades), minlength=num_shades).double() / len(shades)
        hit.append(float((freq > 0).double().mean()))
        # Total variation distance to the data's shade distribution, uniform over the shades.
        tv.append(0.5 * float((freq - 1.0 / num_shades).abs().sum()))
    rate("shades_hit", hit)
    rate("all_shades_hit", [float(h == 1.0) for h in hit])
    mean("shade_tv", tv)
    counts = torch.bincount(torch.tensor([r.nearest_shade for r in results]), minlength=num_shades)
    out["shade_counts"] = [int(c) for c in counts]

    by_frame = frames.mean(0).tolist()
    out["coherence_by_frame"] = by_frame
    out["coherence_by_frame_ci"] = [list(wilson_interval(p, len(results))) for p in by_frame]
    return out


@dataclass
class Evaluation:
    """Per-sample results over the whole videos; segments are judged on demand."""

    samples: list[SampleResult]
    segment_frames: int
    _frames: _Frames = field(repr=False)
    _prompts: list[Prompt] = field(repr=False)

    @property
    def num_frames(self) -> int:
        return self._frames.shade.shape[1]

    def summary(self) -> dict[str, float | list]:
        return summarise(self.samples)

    def segments(self) -> list[list[SampleResult]]:
        """Per-sample results of each `segment_frames`-long segment, judged against frames
        [k*S, (k+1)*S) of the world's clip rendered at the videos' full length."""
        s, total = self.segment_frames, self.num_frames
        if total % s:
            raise ValueError(f"per_segment: {total} frames do not split into segments of {s} frames")
        return [_judge(self._frames, self._prompts, k * s, (k + 1) * s) for k in range(total // s)]

    def per_segment(self) -> list[dict[str, float | list]]:
        return [summarise(segment) for segment in self.segments()]


def format_table(
    rows: Mapping[str, Mapping[str, float | list]],
    columns: Sequence[str] = SUMMARY_KEYS,
    digits: int = 3,
    intervals: bool = False,
) -> str:
    """Summaries (one row per name, e.g. a method or a segment) as a markdown table; with `intervals`,
    a value with a `<key>_ci` shows it as `0.53 [0.45, 0.61]`."""

    def cell(row: Mapping[str, float | list], key: str) -> str:
        value = row[key]
        if isinstance(value, list):
            return "/".join(str(v) for v in value)
        if intervals and f"{key}_ci" in row:
            return with_interval(row, key, digits)
        return f"{value:.{digits}f}"

    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(row, c) for c in columns) + " |" for name, row in rows.items()]
    return "\n".join(lines)


def segment_table(windows: Mapping[str, Sequence[tuple[str, Mapping]]], key: str) -> str:
    """`key` (with its interval) of titled windows, e.g. the 12-frame segments of long rollouts: one row
    per name, one column per window title (the first row's order)."""
    rows = {}
    for name, titled in windows.items():
        row = {}
        for title, summary in titled:
            row[title], row[f"{title}_ci"] = summary[key], summary[f"{key}_ci"]
        rows[name] = row
    columns = [title for title, _ in next(iter(windows.values()))]
    return format_table(rows, columns=columns, digits=2, intervals=True)


def evaluate(
    videos: Tensor, prompts: Sequence[Prompt | str], segment_frames: int = 12, random_start: bool = False
) -> Evaluation:
    """Judge generated videos `[N, F, 3, H, W]` (pixels in [-1, 1]); `prompts[i]` is what video i
    was asked for (a Prompt or its text). `random_start`: the world whose objects start anywhere along
    their path (`world.render`); the start is then fitted like the motion (a nuisance, not judged)."""
    prompts = [Prompt.parse(p) if isinstance(p, str) else p for p in prompts]
    _check_inputs(videos, prompts, segment_frames)
    videos = videos.detach().to("cpu", torch.float32)
    frames = _decode_frames(videos, prompts, random_start)
    samples = _judge(frames, prompts, 0, videos.shape[1])
    return Evaluation(samples, segment_frames, frames, prompts)


def _check_inputs(videos: Tensor, prompts: list[Prompt], segment_frames: int) -> None:
    if not isinstance(videos, Tensor) or videos.dim() != 5 or tuple(videos.shape[2:]) != (3, SIZE, SIZE):
        shape = tuple(videos.shape) if isinstance(videos, Tensor) else type(videos).__name__
        raise ValueError(f"evaluate: videos must be [N, F, 3, {SIZE}, {SIZE}], got {shape}")
    if videos.shape[0] == 0 or videos.shape[1] == 0:
        raise ValueError(f"evaluate: videos {tuple(videos.shape)} hold no frames")
    if len(prompts) != videos.shape[0]:
        raise ValueError(f"evaluate: {videos.shape[0]} videos but {len(prompts)} prompts")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, Prompt)]
    if bad:
        raise ValueError(f"evaluate: prompts[{bad[0]}] is a {type(prompts[bad[0]]).__name__}, not a Prompt")
    if not torch.isfinite(videos).all():
        raise ValueError("evaluate: videos contain NaN or infinite pixels")
    if segment_frames < 1:
        raise ValueError(f"evaluate: segment_frames must be >= 1, got {segment_frames}")


@lru_cache(maxsize=1)
def _footprints() -> Tensor:
    """`[len(SHAPES), H, W, H, W]` bool: the footprint of each shape centred on each pixel."""
    return torch.stack(
        [
            torch.stack([torch.stack([object_mask(s, y, x) for x in range(SIZE)]) for y in range(SIZE)])
            for s in SHAPES
        ]
    )


@lru_cache(maxsize=8)
def _hypothesis_centres(num_frames: int, random_start: bool) -> Tensor:
    """`[len(hypotheses), F, 2]` centre (y, x) of the object under each (direction, speed, start)."""
    any_look = (_COLOUR_NAMES[0], SHAPES[0])  # the trajectory depends on motion only
    return torch.tensor(
        [trajectory(Prompt(*any_look, d, s), num_frames, p) for d, s, p in _hypotheses(random_start)],
        dtype=torch.float32,
    )


@lru_cache(maxsize=512)
def _real_clips(prompt: Prompt, num_frames: int, random_start: bool) -> Tensor:
    """`[K, F, 3, H, W]` the prompt's clips (cached: rendering is the slow part; not mutated)."""
    return torch.stack([render(c, num_frames) for c in clips_of(prompt, random_start)])


def _connected_components(mask: Tensor) -> Tensor:
    """Label `[M, H, W]` boolean masks with 8-connected components (0 = not in the mask).

    Every masked pixel starts with its own id and repeatedly takes the largest id in its 3x3
    neighbourhood inside the mask, so each component converges to its largest id. 8-connectivity:
    pixels touching at a corner read as one blob, so a soft diagonal edge does not split an object.
    """
    m, h, w = mask.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w).expand(m, h, w)
    labels = torch.where(mask, ids, 0.0)
    for _ in range(h * w):  # a path through a component is at most h*w pixels long
        grown = torch.where(mask, F.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0], 0.0)
        if torch.equal(grown, labels):
            break
        labels = grown
    return labels.long()


def _decode_frames(videos: Tensor, prompts: list[Prompt], random_start: bool) -> _Frames:
    n, f = videos.shape[:2]
    pixels = videos.flatten(0, 1)  # [M, 3, H, W], M = N * F

    # 1. Background: the object covers at most 25 of 256 pixels, so the per-channel median is the
    #    background colour even when the object or stray pixels are off; its nearest grey is the shade.
    background = pixels.flatten(2).median(-1).values  # [M, 3]
    shade = torch.cdist(background, _BACKGROUNDS).argmin(-1)

    # 2. Object pixels: far from this frame's own background colour (not the ideal grey, so a
    #    slightly off background does not turn into object pixels). The object is the largest
    #    component; the others only count towards coherence.
    far = (pixels - background[:, :, None, None]).norm(dim=1) > OBJECT_THRESHOLD  # [M, H, W]
    labels = _connected_components(far)
    counts = torch.zeros(labels.shape[0], SIZE * SIZE + 1, dtype=torch.long)
    counts.scatter_add_(1, labels.flatten(1), torch.ones_like(labels.flatten(1)))
    counts[:, 0] = 0
    components = (counts >= MIN_OBJECT_PIXELS).sum(1)
    size, main_label = counts.max(1)
    main = (labels == main_label[:, None, None]) & (size > 0)[:, None, None]

    # 3. Centre (centroid: exact for the world's symmetric footprints), colour and shape. The shape
    #    is the footprint that overlaps the object best at its rounded centre.
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    mass = main.sum((-1, -2)).float()
    centre = torch.stack([(main * yy).sum((-1, -2)) / mass, (main * xx).sum((-1, -2)) / mass], -1)
    colour_sum = (pixels * main[:, None]).sum((-1, -2))
    cy, cx = centre.nan_to_num(0.0).round().long().clamp(0, SIZE - 1).unbind(-1)
    footprint = _footprints()[:, cy, cx]  # [S, M, H, W]
    inter = (footprint & main).sum((-1, -2)).float()
    union = (footprint | main).sum((-1, -2)).float()
    overlap = (inter / union).T  # [M, S]; 0 without an object (the union is the footprint)

    # 4. Motion evidence: distance of the centre from every hypothesis' trajectory, frame by frame.
    centre = centre.view(n, f, 2)
    hypotheses = _hypotheses(random_start)
    fit = (centre[:, None] - _hypothesis_centres(f, random_start)[None]).norm(dim=-1)  # [N, hyp, F]
    # The true paths depend on the prompt's motion (and start) only, so they are hypotheses' paths.
    num_starts = len(starts(random_start))
    # _hypotheses is motion-major: motion m's starts are hypotheses m * num_starts + 0 .. num_starts - 1.
    motion = torch.tensor([_MOTIONS.index((p.direction, p.speed)) for p in prompts])
    asked = motion[:, None] * num_starts + torch.arange(num_starts)  # [N, starts]

    # 5. Distance to every real clip of the prompt, per frame, so any window's RMSE is a mean.
    truth = torch.stack([_real_clips(p, f, random_start) for p in prompts])  # [N, K, F, 3, H, W]
    mse = (videos[:, None] - truth).square().mean((-1, -2, -3))

    return _Frames(
        shade=shade.view(n, f),
        components=components.view(n, f),
        size=size.view(n, f),
        centre=centre,
        colour_sum=colour_sum.view(n, f, 3),
        overlap=overlap.reshape(n, f, len(SHAPES)),
        fit=fit,
        asked=asked,
        mse=mse,
        hypotheses=hypotheses,
        num_starts=num_starts,
    )


def _judge(frames: _Frames, prompts: list[Prompt], start: int, stop: int) -> list[SampleResult]:
    """Results of frames [start, stop) of every video (the truth is the same window of the clip)."""
    w = slice(start, stop)
    size = frames.size[:, w]
    seen = size.sum(1) > 0  # any object pixels in the window

    # Attributes from all frames of the window together: one decision per video.
    colour_mean = frames.colour_sum[:, w].sum(1) / size.sum(1).clamp(min=1)[:, None]
    colour = torch.cdist(colour_mean, _PALETTE).argmin(-1)
    shape = frames.overlap[:, w].sum(1).argmax(-1)
    fit_error, motion = frames.fit[:, :, w].nanmean(-1).nan_to_num(float("inf")).min(-1)
    shade = frames.shade[:, w].mode(-1).values

    frame_coherent = _frame_coherence(frames, shape, w)  # [N, W]
    coherent = frame_coherent.all(1)
    # The asked prompt's path: of its starts, the one the window's centres fit best. A frame without
    # an object is MISSING_DISTANCE from the path (worse than any misplaced object).
    rows = torch.arange(len(prompts))
    asked_fit = frames.fit[rows[:, None], frames.asked][:, :, w]  # [N, starts, W]
    best_start = asked_fit.nanmean(-1).nan_to_num(float("inf")).argmin(-1)
    trajectory_error = asked_fit[rows, best_start].nan_to_num(MISSING_DISTANCE).mean(1)

    rmse, nearest = frames.mse[:, :, w].mean(-1).sqrt().min(-1)
    nearest_shade = nearest // frames.num_starts  # clips_of is shade-major

    results = []
    frame_coherent_rows = frame_coherent.tolist()
    for i, prompt in enumerate(prompts):
        has_object, fits = bool(seen[i]), float(fit_error[i]) <= FIT_TOLERANCE
        decoded_colour = _COLOUR_NAMES[colour[i]] if has_object else None
        decoded_shape = SHAPES[shape[i]] if has_object else None
        direction, speed = frames.hypotheses[motion[i]][:2] if fits else (None, None)
        correct = (
            decoded_colour == prompt.colour,
            decoded_shape == prompt.shape,
            direction == prompt.direction,
            speed == prompt.speed,
        )
        results.append(
            SampleResult(
                prompt=prompt,
                colour=decoded_colour,
                shape=decoded_shape,
                direction=direction,
                speed=speed,
                shade=int(shade[i]),
                fit_error=float(fit_error[i]),
                colour_correct=correct[0],
                shape_correct=correct[1],
                direction_correct=correct[2],
                speed_correct=correct[3],
                all_attributes=all(correct),
                coherent=bool(coherent[i]),
                frame_coherent=tuple(frame_coherent_rows[i]),
                trajectory_error=float(trajectory_error[i]),
                nearest_shade=int(nearest_shade[i]),
                rmse=float(rmse[i]),
                precise=all(correct) and float(rmse[i]) < PRECISION_RMSE,
            )
        )
    return results


def _frame_coherence(frames: _Frames, shape: Tensor, w: slice) -> Tensor:
    """`[N, W]` bool: frame f of window `w` is coherent when it holds exactly one object component,
    sized like the footprint of the window's decoded `shape` [N], and that object is within reach of
    the last earlier frame of the window that held one such object (MAX_SPEED per frame elapsed,
    + JUMP_SLACK). Anchoring on such frames only (not on a frame with two blobs or none, whose
    "centre" means nothing) charges each defect to its own frame: a vanished or doubled object costs
    one frame, a teleport costs the frame it happens in."""
    size = frames.size[:, w]
    target = torch.tensor(FOOTPRINT_SIZES)[shape]  # [N]
    one_object = (frames.components[:, w] == 1) & ((size - target[:, None]).abs() <= SIZE_TOLERANCE)

    # Index of the last earlier one-object frame (-1: none), by a running max over frame indices.
    index = torch.arange(size.shape[1]).expand_as(size)
    last = torch.where(one_object, index, -1).cummax(1).values
    previous = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], 1)
    centre = frames.centre[:, w]
    anchor = centre.gather(1, previous.clamp(min=0)[..., None].expand(-1, -1, 2))
    elapsed = (index - previous).float()
    within_reach = (centre - anchor).norm(dim=-1) <= MAX_SPEED * elapsed + JUMP_SLACK
    return one_object & ((previous < 0) | within_reach)
