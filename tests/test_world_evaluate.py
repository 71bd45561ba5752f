"""The shapes-world evaluator judges pixels exactly: real clips are perfect, corrupted ones are caught.

Every expectation here comes from the world's definitions (the attributes a clip was rendered with,
formulas for coverage written out) or from how a test video was built, never from the evaluator."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from world.evaluate import evaluate, format_table
from world.render import (
    COLOURS,
    SHADES,
    SIZE,
    Clip,
    Prompt,
    all_prompts,
    clips_of,
    object_mask,
    render,
    render_prompt,
    trajectory,
)
from world.stats import beats, mean_interval, wilson_interval

Z = NormalDist().inv_cdf(0.975)
# The documented trajectory error of a frame without an object: the frame's diagonal in pixels.
MISSING = math.hypot(SIZE - 1, SIZE - 1)

PERFECT = {
    "colour": 1.0,
    "shape": 1.0,
    "direction": 1.0,
    "speed": 1.0,
    "all_attributes": 1.0,
    "coherence": 1.0,
    "frame_coherence": 1.0,
    "trajectory_error": 0.0,
    "precision": 1.0,
    "rmse": 0.0,
    "shades_hit": 1.0,
    "all_shades_hit": 1.0,
    "shade_tv": 0.0,
}


def _every_clip(num_frames: int) -> tuple[torch.Tensor, list[Clip]]:
    clips = [c for p in all_prompts() for c in clips_of(p)]
    return torch.stack([render(c, num_frames) for c in clips]), clips


def _draw(shade: int, colour: str, objects: list[list[tuple[str, int, int]]]) -> torch.Tensor:
    """A video `[F, 3, H, W]` in [-1, 1] with the given (shape, y, x) objects in each frame."""
    frames = torch.full((len(objects), 3, SIZE, SIZE), SHADES[shade])
    rgb = torch.tensor(COLOURS[colour]).view(3, 1, 1)
    for f, frame_objects in enumerate(objects):
        for shape, y, x in frame_objects:
            frames[f] = torch.where(object_mask(shape, y, x), rgb, frames[f])
    return frames * 2.0 - 1.0


@pytest.mark.parametrize("num_frames", [12, 36])
def test_every_real_clip_scores_perfectly(num_frames):
    videos, clips = _every_clip(num_frames)
    result = evaluate(videos, [c.prompt for c in clips])
    summary = result.summary()
    assert {k: summary[k] for k in PERFECT} == PERFECT
    assert summary["shade_counts"] == [64, 64, 64]
    assert summary["coherence_by_frame"] == [1.0] * num_frames
    for sample, clip in zip(result.samples, clips, strict=True):
        p = clip.prompt
        assert (sample.colour, sample.shape, sample.direction, sample.speed) == (
            p.colour,
            p.shape,
            p.direction,
            p.speed,
        )
        assert sample.shade == sample.nearest_shade == clip.shade
        assert sample.fit_error == 0.0 and sample.trajectory_error == 0.0
        assert sample.frame_coherent == (True,) * num_frames


@pytest.mark.parametrize("seed", range(6))
def test_shuffled_prompts_are_right_only_by_coincidence(seed):
    videos, clips = _every_clip(12)
    order = torch.randperm(len(clips), generator=torch.Generator().manual_seed(seed)).tolist()
    asked = [clips[i].prompt for i in order]
    result = evaluate(videos, asked)
    truth_of = {p: render_prompt(p, 12) for p in all_prompts()}
    for sample, video, clip, prompt in zip(result.samples, videos, clips, asked, strict=True):
        truth = clip.prompt
        assert sample.colour_correct == (truth.colour == prompt.colour)
        assert sample.shape_correct == (truth.shape == prompt.shape)
        assert sample.direction_correct == (truth.direction == prompt.direction)
        assert sample.speed_correct == (truth.speed == prompt.speed)
        assert sample.all_attributes == (truth == prompt)
        # Precision needs every attribute right, so on real clips it is exactly "asked for this clip",
        # whatever the permutation (a same-motion square for a circle is < 0.1 RMSE but not precise).
        assert sample.precise == (truth == prompt)
        assert sample.coherent  # coherence does not depend on the prompt
        # Brute force: RMSE to the nearest clip of the asked prompt; distance between the two paths.
        rmse = (video - truth_of[prompt]).square().mean((1, 2, 3, 4)).sqrt().min()
        assert sample.rmse == pytest.approx(float(rmse), abs=1e-6)
        gap = [math.dist(a, b) for a, b in zip(trajectory(truth, 12), trajectory(prompt, 12), strict=True)]
        assert sample.trajectory_error == pytest.approx(sum(gap) / len(gap), abs=1e-6)
    summary = result.summary()
    # Chance is 1/4 for colour and direction, 1/2 for shape and speed, 1/64 for everything.
    assert summary["colour"] < 0.4 and summary["direction"] < 0.4
    assert summary["shape"] < 0.65 and summary["speed"] < 0.65
    assert summary["all_attributes"] < 0.06 and summary["precision"] < 0.06


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
def test_noise_scores_chance_or_worse(kind):
    prompts = [c.prompt for p in all_prompts() for c in clips_of(p)]
    gen = torch.Generator().manual_seed(1)
    shape = (len(prompts), 12, 3, SIZE, SIZE)
    videos = (
        torch.rand(shape, generator=gen) * 2 - 1 if kind == "uniform" else torch.randn(shape, generator=gen)
    )
    summary = evaluate(videos, prompts).summary()
    assert summary["colour"] < 0.4 and summary["direction"] < 0.4
    assert summary["shape"] < 0.65 and summary["speed"] < 0.65
    assert summary["all_attributes"] < 0.06
    assert summary["coherence"] == 0.0 and summary["precision"] == 0.0
    assert summary["frame_coherence"] == 0.0
    assert summary["rmse"] > 0.5


def test_teleporting_object_loses_coherence():
    prompt = Prompt("red", "square", "right", "slow")
    path = trajectory(prompt, 12)
    smooth = _draw(0, "red", [[("square", y, x)] for y, x in path])
    # From frame 6 on the object is 6 px lower: every frame alone is a perfect object.
    jumped = _draw(0, "red", [[("square", y + 6 * (f >= 6), x)] for f, (y, x) in enumerate(path)])
    result = evaluate(torch.stack([smooth, jumped]), [prompt, prompt])
    assert result.samples[0].coherent and result.samples[0].all_attributes
    assert not result.samples[1].coherent
    # Only the frame of the jump is charged; the frames after it follow on from it smoothly.
    assert result.samples[1].frame_coherent == (True,) * 6 + (False,) + (True,) * 5
    assert result.samples[1].trajectory_error == pytest.approx(6 * 6 / 12)  # 6 frames 6 px off


def test_second_object_missing_object_or_wrong_size_lose_coherence():
    prompt = Prompt("blue", "circle", "left", "fast")
    path = trajectory(prompt, 12)
    frames = [[("circle", y, x)] for y, x in path]
    # A bigger second object: it, not the circle, is the largest component (the "centre") of frame 5.
    two = [objs + ([("square", 13, 13)] if f == 5 else []) for f, objs in enumerate(frames)]
    gone = [[] if f == 5 else objs for f, objs in enumerate(frames)]
    videos = torch.stack([_draw(1, "blue", v) for v in (frames, two, gone)])
    small = videos[0].clone()  # an object of 9 px, no world footprint, in frame 5
    small[5] = _draw(1, "blue", [[]])[0]
    y, x = path[5]
    small[5, :, y - 1 : y + 2, x - 1 : x + 2] = torch.tensor(COLOURS["blue"]).view(3, 1, 1) * 2 - 1
    result = evaluate(torch.cat([videos, small[None]]), [prompt] * 4)
    assert [s.coherent for s in result.samples] == [True, False, False, False]
    only_frame_5 = tuple(f != 5 for f in range(12))
    assert [s.frame_coherent for s in result.samples[1:]] == [only_frame_5] * 3
    assert result.summary()["coherence_by_frame"] == [1.0] * 5 + [0.25] + [1.0] * 6


def test_shade_coverage_against_the_uniform_data():
    full, one = all_prompts()[:2]
    videos = torch.stack([render(c, 12) for c in clips_of(full)] + [render(Clip(one, 2), 12)] * 3)
    result = evaluate(videos, [full] * 3 + [one] * 3)
    single = evaluate(videos[3:], [one] * 3).summary()
    # One shade out of 3: hit 1/3, TV = 0.5 * (|1 - 1/3| + 2 * |0 - 1/3|) = 2/3.
    assert single["shades_hit"] == pytest.approx(1 / 3)
    assert single["shade_tv"] == pytest.approx(2 / 3)
    assert single["all_shades_hit"] == 0.0 and single["shade_counts"] == [0, 0, 3]
    both = result.summary()
    assert both["shades_hit"] == pytest.approx((1 + 1 / 3) / 2)
    assert both["shade_tv"] == pytest.approx((0 + 2 / 3) / 2)
    assert both["all_shades_hit"] == 0.5 and both["shade_counts"] == [1, 1, 4]


def test_small_pixel_noise_keeps_every_attribute():
    videos, clips = _every_clip(12)
    noisy = videos + 0.05 * torch.randn(videos.shape, generator=torch.Generator().manual_seed(2))
    result = evaluate(noisy, [c.prompt for c in clips])
    summary = result.summary()
    for key in ("colour", "shape", "direction", "speed", "all_attributes", "coherence", "precision"):
        assert summary[key] == 1.0, key
    assert summary["rmse"] == pytest.approx(0.05, abs=0.003)  # the added noise's std
    assert [s.nearest_shade for s in result.samples] == [c.shade for c in clips]


def test_per_segment_follows_the_world_past_the_training_length():
    videos, clips = _every_clip(36)
    prompts = [c.prompt for c in clips]
    segments = evaluate(videos, prompts).per_segment()
    assert len(segments) == 3
    for summary in segments:
        assert {k: summary[k] for k in PERFECT} == PERFECT
    # A segment is judged against that stretch of the full clip, not a fresh clip from the centre.
    restarted = evaluate(videos[:, 12:24], prompts).summary()
    assert restarted["direction"] < 1.0 or restarted["speed"] < 1.0


def test_an_object_that_stops_after_12_frames_fails_motion_later():
    videos, clips = _every_clip(36)
    frozen = videos.clone()
    frozen[:, 12:] = videos[:, 11:12]
    result = evaluate(frozen, [c.prompt for c in clips])
    first, *later = result.segments()
    assert all(s.all_attributes and s.coherent and s.precise for s in first)
    for segment in later:
        for s in segment:
            assert s.colour_correct and s.shape_correct and s.coherent
            assert not (s.direction_correct and s.speed_correct)
    assert result.summary()["direction"] == 0.0  # over the whole clip no motion fits either


def test_text_prompts_and_bad_inputs():
    clip = Clip(Prompt("green", "square", "up", "fast"), 1)
    video = render(clip, 12)[None]
    assert evaluate(video, [clip.prompt.text]).samples == evaluate(video, [clip.prompt]).samples
    with pytest.raises(ValueError, match=r"\[N, F, 3, 16, 16\]"):
        evaluate(video[0], [clip.prompt])
    with pytest.raises(ValueError, match="1 videos but 2 prompts"):
        evaluate(video, [clip.prompt] * 2)
    with pytest.raises(ValueError, match="NaN"):
        evaluate(video * float("nan"), [clip.prompt])
    with pytest.raises(ValueError, match="unknown word"):
        evaluate(video, ["a purple square moving up fast"])
    with pytest.raises(ValueError, match="do not split into segments of 5"):
        evaluate(video, [clip.prompt], segment_frames=5).per_segment()


def test_format_table_renders_one_row_per_summary():
    videos, clips = _every_clip(12)
    summary = evaluate(videos, [c.prompt for c in clips]).summary()
    table = format_table({"data": summary, "again": summary}, columns=("colour", "rmse", "shade_counts"))
    assert table.splitlines() == [
        "| | colour | rmse | shade_counts |",
        "|---|---|---|---|",
        "| data | 1.000 | 0.000 | 64/64/64 |",
        "| again | 1.000 | 0.000 | 64/64/64 |",
    ]


def test_specks_are_not_objects_but_fragments_are():
    """Stray pixels below a quarter of a footprint are sampling noise; a 6-px fragment is a second object."""
    prompt = Prompt("red", "square", "down", "slow")
    clip = _draw(0, "red", [[("square", y, x)] for y, x in trajectory(prompt, 12)])
    red = torch.tensor(COLOURS["red"]).view(3, 1, 1) * 2 - 1
    speck, fragment = clip.clone(), clip.clone()
    speck[4, :, 0, 0:2] = red[:, 0]  # 2 px in a corner
    fragment[4, :, 0, 0:3] = red[:, 0]
    fragment[4, :, 1, 0:3] = red[:, 0]  # 6 px
    result = evaluate(torch.stack([clip, speck, fragment]), [prompt] * 3)
    assert [s.coherent for s in result.samples] == [True, True, False]


def test_a_clip_shifted_by_one_pixel_is_right_but_not_precise():
    prompt = Prompt("red", "square", "up", "slow")  # x stays at the centre column, clear of the walls
    shifted = _draw(1, "red", [[("square", y, x + 1)] for y, x in trajectory(prompt, 12)])
    sample = evaluate(shifted[None], [prompt]).samples[0]
    assert sample.all_attributes and sample.coherent
    assert sample.trajectory_error == 1.0  # every centre exactly one pixel right of the path
    # 2 columns of 5 px change colour in every frame: RMSE far above the 0.1 of precision.
    assert sample.rmse > 0.15 and not sample.precise


def test_a_wrong_shape_close_in_rmse_is_not_precise():
    asked = Prompt("green", "square", "right", "fast")
    drawn = Clip(Prompt("green", "circle", "right", "fast"), 1)
    video = render(drawn, 12)
    # The circle differs from the asked square's clip only in 4 corner pixels per frame.
    assert float((video - render(Clip(asked, 1), 12)).square().mean().sqrt()) < 0.1
    sample = evaluate(video[None], [asked]).samples[0]
    assert sample.rmse < 0.1 and not sample.shape_correct and not sample.precise


@pytest.mark.parametrize("vanished", [(5,), (0, 1), (4, 5, 6), (2, 7, 11)])
def test_an_object_that_vanishes_in_k_frames(vanished):
    prompt = Prompt("yellow", "circle", "down", "fast")
    frames = [[] if f in vanished else [("circle", y, x)] for f, (y, x) in enumerate(trajectory(prompt, 12))]
    video = _draw(2, "yellow", frames)
    k = len(vanished)
    result = evaluate(torch.stack([video, render(Clip(prompt, 2), 12)]), [prompt, prompt])
    sample = result.samples[0]
    # The frames around a gap are coherent: the object comes back on its path, within reach.
    assert sample.frame_coherent == tuple(f not in vanished for f in range(12))
    assert not sample.coherent
    # Present frames are on the path (0 px); each missing frame counts the documented cap.
    assert sample.trajectory_error == pytest.approx(k * MISSING / 12)
    summary = result.summary()
    assert summary["frame_coherence"] == pytest.approx(((12 - k) / 12 + 1.0) / 2)
    # The interval counts videos (2), not frames (24): frames of one video are not independent.
    assert summary["frame_coherence_ci"] == pytest.approx(
        list(_wilson_by_bisection(summary["frame_coherence"], 2))
    )
    assert summary["coherence_by_frame"] == [0.5 if f in vanished else 1.0 for f in range(12)]


def test_a_circle_drawn_with_a_square_sized_blob_is_not_coherent():
    prompt = Prompt("blue", "circle", "left", "slow")
    path = trajectory(prompt, 12)
    # Frame 5 is a square (25 px): a world size, but not the circle's (21 px) the video decodes to.
    blob = _draw(0, "blue", [[("square" if f == 5 else "circle", y, x)] for f, (y, x) in enumerate(path)])
    squares = _draw(0, "blue", [[("square", y, x)] for y, x in path])
    result = evaluate(torch.stack([blob, squares]), [prompt, prompt])
    assert result.samples[0].shape == "circle"
    assert result.samples[0].frame_coherent == tuple(f != 5 for f in range(12))
    # All squares decode as a square and are coherent (coherence does not read the prompt).
    assert result.samples[1].shape == "square" and result.samples[1].coherent


def _wilson_by_bisection(rate: float, n: int) -> tuple[float, float]:
    """The Wilson interval from its definition: the true rates p with (rate - p)^2 <= Z^2 p(1-p)/n,
    whose two boundary roots are found by bisection on either side of `rate`."""

    def excess(p: float) -> float:  # > 0 outside the interval, < 0 inside
        return (rate - p) ** 2 - Z * Z * p * (1 - p) / n

    def root(inside: float, outside: float) -> float:
        if excess(outside) <= 0:
            return outside
        for _ in range(200):
            mid = (inside + outside) / 2
            inside, outside = (mid, outside) if excess(mid) <= 0 else (inside, mid)
        return (inside + outside) / 2

    return root(rate, 0.0), root(rate, 1.0)


@pytest.mark.parametrize(
    ("k", "n"), [(0, 1), (0, 16), (1, 16), (8, 16), (15, 16), (16, 16), (53, 100), (3, 7)]
)
def test_wilson_interval_solves_its_defining_equation(k, n):
    assert wilson_interval(k / n, n) == pytest.approx(_wilson_by_bisection(k / n, n), abs=1e-9)


def test_wilson_interval_contains_the_observed_rate():
    # Plots draw error bars as rate - lo and hi - rate: rounding at 0 and 1 must not make them negative.
    for n in range(1, 200):
        for k in range(n + 1):
            lo, hi = wilson_interval(k / n, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0, (k, n)


def test_wilson_interval_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 10), (3, 10), (10, 10), (37, 160), (159, 160)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson_interval(k / n, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_mean_interval_and_bad_inputs():
    values = [0.3, 0.1, 0.25, 0.4, 0.05]
    mean = sum(values) / 5
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / 4)
    assert mean_interval(values) == pytest.approx((mean - Z * s / math.sqrt(5), mean + Z * s / math.sqrt(5)))
    assert mean_interval([0.2]) == (-math.inf, math.inf)
    with pytest.raises(ValueError, match="n=0"):
        wilson_interval(0.0, 0)
    with pytest.raises(ValueError, match="rate must be in"):
        wilson_interval(1.5, 4)
    with pytest.raises(ValueError, match="no values"):
        mean_interval([])


def test_summary_intervals_are_wilson_over_samples():
    videos, clips = _every_clip(12)
    prompts = [c.prompt for c in clips]
    noise = torch.rand(videos[:6].shape, generator=torch.Generator().manual_seed(3)) * 2 - 1
    summary = evaluate(torch.cat([videos[:10], noise]), prompts[:16]).summary()
    assert summary["all_attributes"] == 10 / 16
    assert summary["all_attributes_ci"] == pytest.approx(list(_wilson_by_bisection(10 / 16, 16)))
    lo, hi = summary["rmse_ci"]
    assert lo < summary["rmse"] < hi
    for rate, ci in zip(summary["coherence_by_frame"], summary["coherence_by_frame_ci"], strict=True):
        assert ci == pytest.approx(list(_wilson_by_bisection(rate, 16)))


def test_beats_only_when_the_intervals_do_not_overlap():
    good = {"all_attributes": 0.9, "all_attributes_ci": [0.8, 0.95], "rmse": 0.05, "rmse_ci": [0.04, 0.06]}
    close = {"all_attributes": 0.75, "all_attributes_ci": [0.6, 0.85], "rmse": 0.07, "rmse_ci": [0.055, 0.08]}
    bad = {"all_attributes": 0.3, "all_attributes_ci": [0.2, 0.4], "rmse": 0.2, "rmse_ci": [0.15, 0.25]}
    touching = {"all_attributes": 0.7, "all_attributes_ci": [0.6, 0.8], "rmse": 0.1, "rmse_ci": [0.06, 0.14]}
    assert not beats(good, close, "all_attributes") and not beats(close, good, "all_attributes")
    assert beats(good, bad, "all_attributes") and not beats(bad, good, "all_attributes")
    assert not beats(good, touching, "all_attributes")  # [0.8, 0.95] touches [0.6, 0.8]
    # Lower is better for RMSE: the lower, separated interval wins.
    assert beats(good, bad, "rmse") and not beats(bad, good, "rmse")
    assert not beats(good, close, "rmse") and not beats(good, touching, "rmse")
    with pytest.raises(ValueError, match="'colour_typo'"):
        beats(good, bad, "colour_typo")
    with pytest.raises(ValueError, match="summary b has no 'precision_ci'"):
        beats({"precision_ci": [0, 1]}, bad, "precision")


def test_format_table_shows_intervals_when_asked():
    row = {"precision": 0.53, "precision_ci": [0.45, 0.61], "shade_counts": [1, 2, 3]}
    table = format_table({"m": row}, columns=("precision", "shade_counts"), digits=2, intervals=True)
    assert table.splitlines()[-1] == "| m | 0.53 [0.45, 0.61] | 1/2/3 |"


@pytest.mark.parametrize("num_frames", [12, 36])
def test_every_random_start_clip_scores_perfectly_and_needs_the_flag(num_frames):
    """Every clip of the random-start world (8 starts x 3 shades per prompt) is perfect when judged as
    that world, whole and per 12-frame segment (the start is fitted, not assumed); judged as the
    centre-start world, the clips that do not start at the centre are off the asked path."""
    from world.render import START

    clips = [c for p in all_prompts()[::5] for c in clips_of(p, random_start=True)]
    videos = torch.stack([render(c, num_frames) for c in clips])
    result = evaluate(videos, [c.prompt for c in clips], random_start=True)
    assert {k: result.summary()[k] for k in PERFECT} == PERFECT
    for segment in result.per_segment():
        assert {k: segment[k] for k in PERFECT} == PERFECT
    for sample, clip in zip(result.samples, clips, strict=True):
        assert (sample.direction, sample.speed) == (clip.prompt.direction, clip.prompt.speed)
        assert sample.shade == sample.nearest_shade == clip.shade
        assert sample.fit_error == 0.0 and sample.trajectory_error == 0.0 and sample.rmse == 0.0
    as_centre = evaluate(videos, [c.prompt for c in clips]).samples
    for sample, clip in zip(as_centre, clips, strict=True):
        assert (sample.trajectory_error == 0.0) == (clip.start == START)
        assert (sample.rmse == 0.0) == (clip.start == START)
