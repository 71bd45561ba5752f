"""The continuation measure (world/continuation.py) on hand-built continuations of real clips.

Expectations come from how each video was built (real clip, frozen first frame, wrong shade, a model
that draws the shade at random) and from a brute-force loop over samples and frames with the RMSE
formula written out here, never from the module itself."""

from __future__ import annotations

import math

import pytest
import torch

from world.continuation import CONTINUATION_RMSE, evaluate_continuation
from world.render import SHADES, Clip, all_prompts, clips_of, render

# Every motion (4 directions x 2 speeds) in both shapes, in one colour each, on every shade.
CLIPS = [c for p in all_prompts() if p.colour in ("red", "blue") and p.shape == "square" for c in clips_of(p)]
CLIPS += [c for p in all_prompts() if p.colour == "green" and p.shape == "circle" for c in clips_of(p)]


def _brute_force(videos: torch.Tensor, clips: list[Clip], start: int, stop: int) -> tuple[float, list[bool]]:
    """Share of samples whose frames [start, stop) are each within RMSE 0.1 of the clip, sample by sample."""
    accurate = []
    for video, clip in zip(videos, clips, strict=True):
        truth = render(clip, video.shape[0])
        ok = True
        for f in range(start, stop):
            diff = (video[f] - truth[f]).flatten().tolist()
            rmse = math.sqrt(sum(d * d for d in diff) / len(diff))
            ok = ok and rmse < 0.1
        accurate.append(ok)
    return sum(accurate) / len(accurate), accurate


def test_real_clips_are_perfect_continuations_at_any_length():
    videos = torch.stack([render(c, 36) for c in CLIPS])
    for k in (1, 3):
        result = evaluate_continuation(videos, CLIPS, num_context_frames=k)
        summary = result.summary()
        assert summary["accuracy"] == 1.0 and summary["shade_kept"] == 1.0
        assert summary["rmse"] == 0.0 and summary["context_rmse"] == 0.0
        # segments of 12 generated frames from the first generated one; the last one is shorter
        assert result.segments() == [(k, k + 12), (k + 12, k + 24), (k + 24, 36)]
        assert [s["accuracy"] for s in result.per_segment()] == [1.0, 1.0, 1.0]


def test_a_frozen_first_frame_keeps_the_shade_but_is_never_a_continuation():
    # Every clip moves at least 1 px per frame, which moves >= 10 object pixels by a whole colour step.
    videos = torch.stack([render(c, 13)[:1].expand(13, -1, -1, -1) for c in CLIPS])
    result = evaluate_continuation(videos, CLIPS, num_context_frames=1)
    expected, per_sample = _brute_force(videos, CLIPS, 1, 13)
    assert expected == 0.0 and not any(per_sample)
    assert result.summary()["accuracy"] == expected
    assert result.summary()["shade_kept"] == 1.0
    assert result.summary()["context_rmse"] == 0.0


def test_the_right_motion_on_the_wrong_shade_fails_both_measures():
    def wrong(c: Clip) -> torch.Tensor:
        given = render(c, 13)[:1]
        rest = render(Clip(c.prompt, (c.shade + 1) % len(SHADES)), 13)[1:]
        return torch.cat([given, rest])

    videos = torch.stack([wrong(c) for c in CLIPS])
    summary = evaluate_continuation(videos, CLIPS, num_context_frames=1).summary()
    assert summary["accuracy"] == _brute_force(videos, CLIPS, 1, 13)[0] == 0.0
    assert summary["shade_kept"] == 0.0
    # background off by one shade step (0.25 in [0, 1], 0.5 in pixel units) on every background pixel
    assert summary["rmse"] > 0.4


def test_a_model_that_ignores_the_image_keeps_the_shade_one_time_in_three():
    # For every given clip, one continuation on each shade: the right clip exactly one time in three.
    clips = [c for c in CLIPS for _ in SHADES]
    videos = torch.stack([render(Clip(c.prompt, s), 13) for c in CLIPS for s in range(len(SHADES))])
    videos[:, 0] = torch.stack([render(c, 1)[0] for c in clips])  # the given frame is the real one
    summary = evaluate_continuation(videos, clips, num_context_frames=1).summary()
    assert summary["shade_kept"] == pytest.approx(1 / 3)
    assert summary["accuracy"] == pytest.approx(_brute_force(videos, clips, 1, 13)[0]) == pytest.approx(1 / 3)


def test_segments_judge_each_stretch_of_generated_frames_on_its_own():
    # Right for the first 12 generated frames, then the object stops: segment 1 fails, segment 0 and
    # the shade do not; the whole continuation is not accurate.
    k, total = 3, 27
    videos = torch.stack([render(c, total) for c in CLIPS])
    videos[:, k + 12 :] = videos[:, k + 11 : k + 12]
    result = evaluate_continuation(videos, CLIPS, num_context_frames=k)
    segments = result.per_segment()
    assert [(s["start"], s["stop"]) for s in segments] == [(3, 15), (15, 27)]
    for seg in segments:
        assert seg["accuracy"] == _brute_force(videos, CLIPS, seg["start"], seg["stop"])[0]
        assert seg["shade_kept"] == 1.0
    assert segments[0]["accuracy"] == 1.0 and segments[1]["accuracy"] == 0.0
    assert result.summary()["accuracy"] == 0.0


def test_a_small_error_inside_the_threshold_still_counts():
    # Uniform noise of amplitude a has RMSE a / sqrt(3): below the threshold for a = 0.15, above for 0.2.
    g = torch.Generator().manual_seed(0)
    truth = torch.stack([render(c, 13) for c in CLIPS])
    for amplitude, accurate in ((0.15, True), (0.2, False)):
        noise = (torch.rand(truth.shape, generator=g) * 2 - 1) * amplitude
        noise[:, 0] = 0
        result = evaluate_continuation(truth + noise, CLIPS, num_context_frames=1)
        assert result.summary()["accuracy"] == float(accurate), amplitude
        assert result.summary()["shade_kept"] == 1.0
        assert (amplitude / math.sqrt(3) < CONTINUATION_RMSE) == accurate


def test_bad_inputs_are_named():
    videos = torch.stack([render(c, 6) for c in CLIPS[:2]])
    with pytest.raises(ValueError, match=r"num_context_frames=6 must leave generated frames"):
        evaluate_continuation(videos, CLIPS[:2], num_context_frames=6)
    with pytest.raises(ValueError, match="2 videos but 1 clips"):
        evaluate_continuation(videos, CLIPS[:1], num_context_frames=1)
    with pytest.raises(ValueError, match=r"clips\[1\] is a str"):
        evaluate_continuation(videos, [CLIPS[0], "a red square moving left fast"], num_context_frames=1)
    with pytest.raises(ValueError, match=r"videos must be \[N, F, 3, 16, 16\]"):
        evaluate_continuation(videos[..., :8], CLIPS[:2], num_context_frames=1)
    nan = videos.clone()
    nan[0, 3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        evaluate_continuation(nan, CLIPS[:2], num_context_frames=1)
    with pytest.raises(ValueError, match=r"window \[0, 6\) must lie within the generated frames \[1, 6\)"):
        evaluate_continuation(videos, CLIPS[:2], num_context_frames=1).window(0, 6)
