"""Continuation evaluation of the chain's students: given the first frames of a real clip, go on.

Every student (T2V students too) is given the first frames of real held-out clips, caches them as
clean context (t = 0, exactly as `inference.py --image / --video` and the training rollout's
`initial_latent` do: `world.sampling.generate(..., context=...)`) and rolls out with its own
few-step pipeline; `world.continuation.evaluate_continuation` judges the result frame by frame
against the true clip (continuation accuracy and shade kept, per segment of 12 generated frames).

Settings (`SETTINGS`), each counted in GENERATED frames after the given ones:

* `first_block`: the first block (3 latent frames, the students' `num_frame_per_block`) + 9 frames, to
  the students' training length (12): continuation where every frame has been trained;
* `first_block_long`: the first block + 36 frames (3 segments of 12), the long-rollout rule of the
  T2V evaluation (a rolling KV window, whose sink is the given block, past the training length);
* `first_frame`: one frame (an image) + 12 frames: image-to-video, the I2V student's training layout
  (1 + 4 blocks of 3) and the T2V Self-Forcing DMD student given the same image.

Noise follows the T2V evaluation's rule: sample i of the whole call starts from the noise seeded by
(seed, i). Sample i of prompt j continues the clip with shade `(j + i) % 3` (balanced shades).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .continuation import Continuation, context_frames, evaluate_continuation
from .render import SHADES, Clip, Prompt, starts
from .stats import mean_interval, wilson_interval

__all__ = [
    "SEGMENT_FRAMES", "SETTINGS", "Setting", "continue_clips", "continuation_clips", "run_continuation_eval",
    "summarise", "window_overrides",
]  # fmt: skip

SEGMENT_FRAMES = 12  # generated frames per judged segment (the training length)
STRIP_PROMPTS = 4  # held-out prompts shown as strips in the report


@dataclass(frozen=True)
class Setting:
    name: str
    title: str
    num_context_frames: int  # given latent frames (= pixel frames: the world codec has no time compression)
    generated_frames: int
    long: bool = False  # sampled `long_samples` times per prompt instead of `eval_samples`

    @property
    def num_frames(self) -> int:
        return self.num_context_frames + self.generated_frames


SETTINGS = {
    s.name: s
    for s in (
        Setting("first_block", "given the first block (3 frames), 9 generated frames (to 12)", 3, 9),
        Setting(
            "first_block_long", "given the first block (3 frames), 36 generated frames", 3, 36, long=True
        ),
        Setting("first_frame", "given the first frame (image-to-video), 12 generated frames", 1, 12),
    )
}


def continuation_clips(prompts: Sequence[Prompt], samples: int, random_start: bool = False) -> list[Clip]:
    """`samples` clips per prompt, prompt by prompt: sample i of prompt j has shade `(j + i) % 3`, so
    the shades stay balanced over the prompts even with fewer than 3 samples per prompt (a model that
    always draws one shade must not look right); with `random_start`, start `STARTS[(j + i) % 8]`
    (every shade-start pair once in 24 consecutive samples)."""
    first = starts(random_start)
    return [
        Clip(q, (j + i) % len(SHADES), first[(j + i) % len(first)])
        for j, q in enumerate(prompts)
        for i in range(samples)
    ]


def window_overrides(config: Path, num_frames: int, window: Sequence[str]) -> tuple[str, ...]:
    """`window` for a rollout past the run's training length when the run has no window of its own (a
    run trained with a window keeps it)."""
    from .sampling import load_run_config

    cfg = load_run_config(config)
    if num_frames <= cfg.num_training_frames or cfg.model_kwargs.local_attn_size != -1:
        return ()
    return tuple(window)


def continue_clips(
    run_dir: Path, clips: Sequence[Clip], setting: Setting, window: Sequence[str] = (), seed: int = 0
) -> Tensor:
    """Pixels `[N, K + G, 3, 16, 16]`: the run's student continuing each clip from its first K frames."""
    from .sampling import generate

    config = Path(run_dir) / "config.yaml"
    given = context_frames(clips, setting.num_context_frames)
    overrides = window_overrides(config, setting.num_frames, window)
    return generate(
        Path(run_dir), config, [c.prompt for c in clips], setting.num_frames, overrides, seed, context=given
    )


def _window(cont: Continuation, start: int, stop: int) -> dict:
    """`Continuation.window` with 95% intervals: Wilson for the two rates, normal for the mean RMSE."""
    out = cont.window(start, stop)
    n = cont.frame_rmse.shape[0]
    per_sample = cont.frame_rmse[:, start:stop].square().mean(1).sqrt().tolist()
    out.update(
        n=n,
        accuracy_ci=wilson_interval(out["accuracy"], n),
        shade_kept_ci=wilson_interval(out["shade_kept"], n),
        rmse_ci=mean_interval(per_sample),
    )
    return out


def summarise(cont: Continuation) -> dict:
    """`{"summary": all generated frames, "segments": [per segment of 12 generated frames]}`, with intervals."""
    summary = _window(cont, cont.num_context_frames, cont.num_frames)
    summary["context_rmse"] = cont.frame_rmse[:, : cont.num_context_frames].max().item()
    return {"summary": summary, "segments": [_window(cont, a, b) for a, b in cont.segments()]}


def _strip_rows(prompts: Sequence[Prompt], samples: int) -> list[int]:
    """Which sample to show for each of the first prompts: sample `j % samples` of prompt j."""
    return [j * samples + j % samples for j in range(min(STRIP_PROMPTS, len(prompts)))]


def run_continuation_eval(
    runs: Mapping[str, Path],
    settings_of: Mapping[str, Sequence[str]],
    prompts: Sequence[Prompt],
    eval_samples: int,
    long_samples: int,
    window: Sequence[str],
    out_dir: Path,
    say=print,
    random_start: bool = False,
) -> dict:
    """Continue held-out clips with every run (`settings_of[name]`: the settings it is judged on) and
    write `<out_dir>/continuation.json` (`{method: {setting: {"summary", "segments"}}}`, with a "data"
    row: the real clips themselves, and a "settings" entry) and `continuation_samples.pt` (per setting:
    `{"clips": [(prompt, shade, start)], "num_context_frames", "videos": {method: [n, F, 3, H, W]}}`).
    `random_start`: the clips of the world whose objects start anywhere along their path."""
    used = [SETTINGS[s] for s in SETTINGS if any(s in names for names in settings_of.values())]
    results: dict[str, dict] = {
        "settings": {
            s.name: {
                "title": s.title,
                "num_context_frames": s.num_context_frames,
                "generated_frames": s.generated_frames,
            }
            for s in used
        },
        "data": {},
    }
    samples: dict[str, dict] = {}
    for setting in used:
        n = long_samples if setting.long else eval_samples
        clips = continuation_clips(prompts, n, random_start)
        truth = context_frames(clips, setting.num_frames)  # the real clips, whole
        results["data"][setting.name] = summarise(
            evaluate_continuation(truth, clips, setting.num_context_frames, SEGMENT_FRAMES)
        )
        rows = _strip_rows(prompts, n)
        samples[setting.name] = {
            "clips": [(clips[i].prompt.text, clips[i].shade, clips[i].start) for i in rows],
            "num_context_frames": setting.num_context_frames,
            "videos": {},
        }
        for name, run_dir in runs.items():
            if setting.name not in settings_of.get(name, ()):
                continue
            videos = continue_clips(run_dir, clips, setting, window)
            cont = evaluate_continuation(videos, clips, setting.num_context_frames, SEGMENT_FRAMES)
            results.setdefault(name, {})[setting.name] = summarise(cont)
            samples[setting.name]["videos"][name] = videos[rows]
            s = results[name][setting.name]["summary"]
            say(f"  {name}, {setting.title}: accuracy {s['accuracy']:.2f}, shade kept {s['shade_kept']:.2f}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "continuation.json").write_text(json.dumps(results, indent=1))
    torch.save(samples, out_dir / "continuation_samples.pt")
    return results
