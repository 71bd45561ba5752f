"""The shapes-world evaluator judges pixels exactly: real clips are perfect, corrupted ones are caught.

Every expectation here comes from the world's definitions (the attributes a clip was rendered with,
formulas for coverage written out) or from how a test video was built, never from the evaluator."""

from __future__ import annotations

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
    trajectory,
)

PERFECT = {
    "colour": 1.0,
    "shape": 1.0,
    "direction": 1.0,
    "speed": 1.0,
    "all_attributes": 1.0,
    "coherence": 1.0,
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
    for sample, clip in zip(result.samples, clips, strict=True):
        p = clip.prompt
        assert (sample.colour, sample.shape, sample.direction, sample.speed) == (
            p.colour,
            p.shape,
            p.direction,
            p.speed,
        )
        assert sample.shade == sample.nearest_shade == clip.shade
        assert sample.fit_error == 0.0


def test_shuffled_prompts_are_right_only_by_coincidence():
    videos, clips = _every_clip(12)
    order = torch.randperm(len(clips), generator=torch.Generator().manual_seed(0)).tolist()
    asked = [clips[i].prompt for i in order]
    result = evaluate(videos, asked)
    for sample, clip, prompt in zip(result.samples, clips, asked, strict=True):
        truth = clip.prompt
        assert sample.colour_correct == (truth.colour == prompt.colour)
        assert sample.shape_correct == (truth.shape == prompt.shape)
        assert sample.direction_correct == (truth.direction == prompt.direction)
        assert sample.speed_correct == (truth.speed == prompt.speed)
        assert sample.all_attributes == (truth == prompt)
        assert sample.precise == (truth == prompt)
        assert sample.coherent  # coherence does not depend on the prompt
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


def test_second_object_missing_object_or_wrong_size_lose_coherence():
    prompt = Prompt("blue", "circle", "left", "fast")
    path = trajectory(prompt, 12)
    frames = [[("circle", y, x)] for y, x in path]
    two = [objs + ([("circle", 13, 13)] if f == 5 else []) for f, objs in enumerate(frames)]
    gone = [[] if f == 5 else objs for f, objs in enumerate(frames)]
    videos = torch.stack([_draw(1, "blue", v) for v in (frames, two, gone)])
    small = videos[0].clone()  # an object of 9 px, no world footprint, in frame 5
    small[5] = _draw(1, "blue", [[]])[0]
    y, x = path[5]
    small[5, :, y - 1 : y + 2, x - 1 : x + 2] = torch.tensor(COLOURS["blue"]).view(3, 1, 1) * 2 - 1
    result = evaluate(torch.cat([videos, small[None]]), [prompt] * 4)
    assert [s.coherent for s in result.samples] == [True, False, False, False]


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
