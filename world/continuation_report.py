"""The report's continuation section: tables with 95% intervals per setting and per segment, the I2V
targets, and strips / mp4s of the given frames, the generated ones and the truth side by side.

Written from `world.continuation_eval`'s files (continuation.json, continuation_samples.pt), never
from a model or the chain.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from .continuation import CONTINUATION_RMSE, context_frames
from .evaluate import format_table, segment_table
from .render import SHADES, Clip, Prompt
from .stats import beats, with_interval

__all__ = ["I2V", "I2V_TARGETS", "T2V", "continuation_section"]

I2V = "sf_dmd_i2v"  # the image-to-video Self-Forcing DMD student
T2V = "sf_dmd"  # the T2V Self-Forcing DMD student it is compared with, given the same first frame
I2V_SETTING = "first_frame"
# Issue 16's targets for the I2V student given the first frame, over its 12 generated frames.
I2V_TARGETS = {"shade_kept": 0.95, "accuracy": 0.8}
COLUMNS = ("accuracy", "shade_kept", "rmse", "worst_frame_rmse", "context_rmse")
SCALE = 4  # pixels per world pixel in the strips and mp4s
GIVEN = np.array([40, 200, 40], np.uint8)  # border of the given frames in the strips
SEPARATOR = np.array([255, 255, 255], np.uint8)


def _guide() -> list[str]:
    return [
        "Every student (the T2V ones too) is given the first frames of a real held-out clip, caches them",
        "as clean context (t = 0, as `inference.py --image / --video` does) and rolls out with its own",
        "4-step pipeline; sample i of prompt j continues the clip with shade (i + j) mod 3, from the T2V",
        "evaluation's seeded noise. *Accuracy*: the share of samples whose every generated frame is within",
        f"RMSE {CONTINUATION_RMSE} of the same frame of the true clip; *shade kept*: the share whose",
        "generated frames mostly show the given frames' background shade (a model that ignores them keeps",
        f"it 1 time in {len(SHADES)}). *rmse*: per-sample RMSE over the generated frames, averaged; *worst frame",
        "rmse*: the worst generated frame per sample, averaged; *context rmse*: the largest error of a",
        "given frame (0: they come back unchanged). Rates: Wilson 95% intervals; RMSE: normal intervals.",
        "",
    ]


def _targets(results: Mapping, label: Callable[[str], str]) -> list[str]:
    if I2V_SETTING not in results.get(I2V, {}):
        return []
    mine = results[I2V][I2V_SETTING]["summary"]
    lines = [f"### Targets ({label(I2V)}, given the first frame, 12 generated frames)", ""]
    for key, target in I2V_TARGETS.items():
        ok = mine[key] >= target
        lines.append(
            f"- {key} = {with_interval(mine, key)} (target >= {target}): {'met' if ok else 'MISSED'}"
        )
    if I2V_SETTING in results.get(T2V, {}):
        theirs = results[T2V][I2V_SETTING]["summary"]
        for key in ("shade_kept", "accuracy"):
            verdict = "met" if beats(mine, theirs, key) else "MISSED (the intervals overlap or it loses)"
            lines.append(
                f"- beats {label(T2V)} given the same frame on {key} ({with_interval(theirs, key)}): {verdict}"
            )
    return [*lines, ""]


def _tables(results: Mapping, label: Callable[[str], str]) -> list[str]:
    lines: list[str] = []
    methods = [m for m in results if m != "settings"]
    for name, setting in results["settings"].items():
        rows = {label(m): results[m][name]["summary"] for m in methods if name in results[m]}
        lines += [
            f"### {setting['title']}",
            "",
            format_table(rows, columns=COLUMNS, digits=2, intervals=True),
            "",
        ]
        segments = {m: results[m][name]["segments"] for m in methods if name in results[m]}
        if max(len(s) for s in segments.values()) > 1:
            for key in ("accuracy", "shade_kept"):
                windows = {
                    label(m): [(f"frames {seg['start']}-{seg['stop'] - 1}", seg) for seg in segs]
                    for m, segs in segments.items()
                }
                lines += [f"{key} per segment of 12 generated frames (frame 0 is the first given one):", ""]
                lines += [segment_table(windows, key), ""]
    return lines


def _frames(video: torch.Tensor, given: int) -> list[np.ndarray]:
    """`[F, 3, H, W]` in [-1, 1] -> F uint8 `[H*SCALE + 4, W*SCALE + 4, 3]` tiles; a green border
    marks the given frames, a white one the rest."""
    x = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.repeat_interleave(SCALE, dim=2).repeat_interleave(SCALE, dim=3).permute(0, 2, 3, 1).numpy()
    return [_border(f, GIVEN if i < given else SEPARATOR) for i, f in enumerate(x)]


def _border(tile: np.ndarray, colour: np.ndarray) -> np.ndarray:
    h, w, _ = tile.shape
    out = np.empty((h + 4, w + 4, 3), np.uint8)
    out[:] = colour
    out[2:-2, 2:-2] = tile
    return out


def _strips(
    samples: Mapping, results: Mapping, label: Callable[[str], str], root: Path, fig_dir: Path
) -> list[str]:
    """One PNG per shown clip and setting (rows: the truth, then each method) and one mp4 with them
    side by side, frame by frame."""
    import imageio.v2 as imageio

    lines = ["### Samples: the truth, then each student (given frames framed in green)", ""]
    for name, part in samples.items():
        methods = [m for m in results if m not in ("settings", "data") and m in part["videos"]]
        if not methods:
            continue
        k = part["num_context_frames"]
        lines += [
            f"{results['settings'][name]['title']}; rows: truth, " + ", ".join(label(m) for m in methods),
            "",
        ]
        for i, (text, shade, *start) in enumerate(part["clips"]):  # start: absent in older runs
            video = part["videos"][methods[0]][i]
            truth = context_frames([Clip(Prompt.parse(text), shade, *start)], video.shape[0])[0]
            rows = [_frames(truth, k), *(_frames(part["videos"][m][i], k) for m in methods)]
            stem = f"continuation_{name}_{i}"
            imageio.imwrite(fig_dir / f"{stem}.png", np.concatenate([np.concatenate(r, 1) for r in rows], 0))
            frames = [np.concatenate([r[f] for r in rows], 1) for f in range(len(rows[0]))]
            imageio.mimwrite(fig_dir / f"{stem}.mp4", frames, fps=4, codec="libx264", macro_block_size=1)
            rel = (fig_dir / stem).relative_to(root).as_posix()
            lines.append(f"{text}, shade {shade}: ![{stem}]({rel}.png) ([mp4]({rel}.mp4))  ")
        lines.append("")
    return lines


def continuation_section(
    metrics: Path, samples: Path | None, label: Callable[[str], str], root: Path, fig_dir: Path
) -> list[str]:
    """Markdown lines of the continuation section (and its figures under `fig_dir`)."""
    lines = ["## Continuation (held-out prompts): given a real clip's first frames, go on", ""]
    if not Path(metrics).is_file():  # an eval stage finished before continuation was evaluated
        return [*lines, f"No results: {metrics} is missing (delete the eval stage's folder to rerun it).", ""]
    results = json.loads(Path(metrics).read_text())
    lines += _guide()
    lines += _targets(results, label)
    lines += _tables(results, label)
    if samples is not None and Path(samples).is_file():
        lines += _strips(torch.load(samples), results, label, Path(root), Path(fig_dir))
    return lines
