"""world.seeds pools several runs' summaries: the pooled summary equals the summary of the concatenated
samples (world.evaluate's and world.continuation_eval's own summarisers on all samples at once), and the
pooled report's verdicts follow how synthetic runs were built (real clips beat noise on every run)."""

from __future__ import annotations

import json

import pytest
import torch

from world.continuation import Continuation
from world.continuation_eval import _window
from world.continuation_eval import summarise as summarise_continuation
from world.evaluate import evaluate, summarise
from world.render import Clip, Prompt, render
from world.seeds import CONTINUATION_MEANS, CONTINUATION_RATES, MEAN_KEYS, RATE_KEYS, main, pool, seeds_report

PROMPTS = [Prompt("red", "square", "up", "slow"), Prompt("green", "circle", "down", "fast")]
PER_PROMPT = 6


def _videos(kind: str, frames: int = 12, seed: int = 0) -> torch.Tensor:
    clips = torch.stack([render(Clip(p, i % 3), frames) for p in PROMPTS for i in range(PER_PROMPT)])
    if kind == "real":
        return clips
    if kind == "mixed":  # a third exact, a third one pixel off, a third noise from the middle on
        out = clips.clone()
        out[1::3] = clips[1::3].roll(1, dims=-1)
        g = torch.Generator().manual_seed(seed)
        out[2::3, frames // 2 :] = torch.rand(out[2::3, frames // 2 :].shape, generator=g) * 2 - 1
        return out
    return torch.rand(clips.shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


ASKED = [p for p in PROMPTS for _ in range(PER_PROMPT)]


def _assert_same(pooled: dict, whole: dict, rates, means) -> None:
    for key in (*rates, *means):
        assert pooled[key] == pytest.approx(whole[key], abs=1e-12), key
        assert pooled[f"{key}_ci"] == pytest.approx(list(whole[f"{key}_ci"]), abs=1e-9), key


def test_pooled_summary_is_the_summary_of_all_samples():
    samples = evaluate(_videos("mixed"), ASKED).samples
    parts = [samples[:5], samples[5:7], samples[7:]]  # uneven counts weight the rates
    whole = summarise(samples)
    pooled = pool([summarise(p) for p in parts])
    assert pooled["n"] == len(samples)
    assert 0 < whole["coherence"] < 1 and whole["rmse_ci"][1] > whole["rmse_ci"][0]  # the mix varies
    _assert_same(pooled, whole, RATE_KEYS, MEAN_KEYS)
    assert pooled["shade_counts"] == whole["shade_counts"]
    assert pooled["coherence_by_frame"] == pytest.approx(whole["coherence_by_frame"], abs=1e-12)
    flat = [x for ci in pooled["coherence_by_frame_ci"] for x in ci]
    assert flat == pytest.approx([x for ci in whole["coherence_by_frame_ci"] for x in ci], abs=1e-9)


def test_pooled_continuation_is_the_window_of_all_continuations():
    g = torch.Generator().manual_seed(0)
    n, frames = 11, 12
    clips = [Clip(PROMPTS[i % 2], i % 3) for i in range(n)]
    rmse = torch.rand(n, frames, generator=g, dtype=torch.float64) * 0.15
    shade = torch.randint(0, 3, (n, frames), generator=g)

    def window(rows: slice) -> dict:
        cont = Continuation(clips[rows], 3, 12, rmse[rows], shade[rows])
        return _window(cont, 3, frames)

    whole = window(slice(None))
    assert 0 < whole["accuracy"] < 1
    pooled = pool([window(slice(0, 4)), window(slice(4, None))], CONTINUATION_RATES, CONTINUATION_MEANS)
    assert pooled["n"] == n
    _assert_same(pooled, whole, CONTINUATION_RATES, CONTINUATION_MEANS)


def _root(tmp_path, name: str, seed: int, world: str = "World: centre.") -> str:
    root = tmp_path / name
    (root / "eval").mkdir(parents=True)
    metrics = {}
    for method, kind in (
        ("data", "real"),
        ("sf_dmd", "real"),
        ("ode", "noise"),
        ("dmd_teacher_forcing", "mixed"),
    ):
        ev = evaluate(_videos(kind, seed=seed), ASKED)
        metrics[method] = {"heldout": {"summary": ev.summary(), "segments": ev.per_segment()}}
    (root / "eval" / "metrics.json").write_text(json.dumps(metrics))
    # continuations: Self-Forcing DMD from a first block (all exact), the I2V student from a first frame only
    clips = [Clip(p, i % 3) for p in PROMPTS for i in range(PER_PROMPT)]
    exact = torch.zeros(len(clips), 12)
    off = exact.clone()
    off[seed::4, 5] = 0.5  # every fourth continuation (from `seed`) misses one frame
    shade = torch.tensor([c.shade for c in clips])[:, None].expand(-1, 12)
    continuation = {
        "sf_dmd": {"first_block": summarise_continuation(Continuation(clips, 3, 12, exact, shade))},
        "sf_dmd_i2v": {"first_frame": summarise_continuation(Continuation(clips, 1, 12, off, shade))},
    }
    (root / "eval" / "continuation.json").write_text(json.dumps(continuation))
    (root / "report.md").write_text(f"# report\n\n{world}\n")
    return root


def test_seeds_report_pools_runs_and_counts_the_runs_each_student_loses(tmp_path):
    roots = [_root(tmp_path, "a", 1), _root(tmp_path, "b", 2)]
    out = tmp_path / "seeds.md"
    main([*map(str, roots), "--out", str(out)])
    text = out.read_text()
    held = text.split("## Held-out prompts, 12 frames")[1].split("##")[0]
    sf = next(line for line in held.splitlines() if line.startswith("| Self-Forcing DMD"))
    n = 2 * len(ASKED)
    assert sf.startswith(f"| Self-Forcing DMD | {n} | 1.00 [")  # both runs' samples
    coherence = text.split("### coherence")[1].split("###")[0]
    ode = next(line for line in coherence.splitlines() if line.startswith("| ODE init"))
    assert "**beats** 0.00 [0.00, 0." in ode and "(runs: 2/2)" in ode  # noise is never coherent
    assert "World: centre." in text
    cont = text.split("## Continuation")[1]
    rows = {line.split(" | ")[0]: line for line in cont.splitlines() if line.startswith("| ")}
    assert rows["| Self-Forcing DMD"].endswith(
        f"| accuracy 1.00 [0.86, 1.00] (runs 1.00 / 1.00), n {n} | - |"
    )
    # seed 1 misses rows 1, 5, 9 (3 of 12), seed 2 rows 2, 6, 10: 6 of 24 pooled
    assert "accuracy 0.75 [" in rows["| Self-Forcing DMD, image-to-video"]
    assert rows["| Self-Forcing DMD, image-to-video"].startswith(
        "| Self-Forcing DMD, image-to-video | - | accuracy"
    )


def test_seeds_report_refuses_runs_of_different_worlds_and_missing_evaluations(tmp_path):
    a = _root(tmp_path, "a", 1)
    b = _root(tmp_path, "b", 2, world="World: random starts.")
    with pytest.raises(ValueError, match="different worlds"):
        seeds_report([a, b])
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        seeds_report([a, tmp_path / "nowhere"])
    with pytest.raises(ValueError, match="at least two"):
        seeds_report([a])
