"""`report.md` of a shapes-world chain: the base model first, targets, verdicts, tables per split with
95% intervals, per-segment quality of long rollouts, plots, sample strips and mp4s.

The report is written from the evaluation's results and paths (`ReportInputs`), not from the chain
that produced them, so it can be rebuilt from any run directory and `world.chain` stays the only side
that knows the stages. Every "beats" in the report comes from `world.stats.beats`: intervals that do
not overlap, samples treated as independent Bernoulli draws.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import figures
from .continuation_report import continuation_section
from .evaluate import (
    JUMP_SLACK,
    MAX_SPEED,
    MISSING_DISTANCE,
    PRECISION_RMSE,
    SIZE_TOLERANCE,
    format_table,
    segment_table,
)
from .render import Prompt, render_prompt
from .stats import beats, with_interval

COLUMNS = ("all_attributes", "colour", "shape", "direction", "speed", "coherence", "frame_coherence",
           "trajectory_error", "precision", "rmse", "all_shades_hit", "shade_tv", "shade_counts")  # fmt: skip
TARGETS = {"all_attributes": 0.9, "coherence": 0.9, "precision": 0.8, "all_shades_hit": 1.0}
MAX_SHADE_TV = 0.3
SPLITS = {
    "heldout": "Held-out prompts, 12 frames (the training length)",
    "train": "Training prompts, 12 frames",
    "heldout_long": "Held-out prompts, 36 frames (3x, rolling KV window of 12 frames; the world line above says which sink)",
}
BASE_SPLITS = {
    "heldout": "held-out prompts, the students' 4-step schedule",
    "train": "training prompts, 4 steps",
    "heldout_ode40": "held-out prompts, 40-step ODE",
    "train_ode40": "training prompts, 40-step ODE",
}
# Issue 14's targets for the base, on held-out prompts with the 40-step ODE; x0 RMSE at t = 500.
BASE_TARGETS = {"all_attributes": 0.9, "coherence": 0.9}
BASE_TARGET_SPLIT = "heldout_ode40"
MAX_BASE_X0_RMSE = ("500", 0.05)
# Self-Forcing DMD against every other student on these, at 12 frames and per long-rollout segment.
# coherence (every frame of a video coherent) is the strict sharpness rate the targets name; frame
# coherence the share of coherent frames, which ranks students that are not yet sharp.
VERDICT_KEYS = ("all_attributes", "coherence", "frame_coherence", "trajectory_error", "precision")
# The rivals of the target "beats its ODE init, TF-DMD and DF-DMD beyond the intervals".
RIVALS = ("ode", "dmd_teacher_forcing", "dmd_diffusion_forcing")
METHOD = "sf_dmd"
DEFAULT_LABELS = {"data": "data (real clips)", "base": "base model (bidirectional)"}


@dataclass(frozen=True)
class ReportInputs:
    """What the report is written from: evaluation results and paths, nothing of the chain itself."""

    root: Path  # report.md and figures/ are written here; links in the report are relative to it
    profile: str
    machine: str
    metrics: Path  # metrics.json: {method: {split: {"summary", "segments"}}}, optionally a "base" entry
    samples: Path  # samples.pt: {method: [n, F, 3, H, W]}, sample i drawn for heldout_prompts[i]
    students: Sequence[str]  # evaluated students in table order; "sf_dmd" is the method under test
    heldout_prompts: Sequence[Prompt]
    stage_times: Mapping[str, float | None]  # wall seconds of every stage in run order; None: not run
    loss_logs: Mapping[str, Path]  # training stage -> its metrics.jsonl
    labels: Mapping[str, str] = field(default_factory=dict)  # method -> display name
    continuation: Path | None = None  # continuation.json of world.continuation_eval (None: no section)
    continuation_samples: Path | None = None  # its continuation_samples.pt (strips and mp4s)
    world: str = ""  # which world and long-rollout window the run used (a "World:" line when given)

    def label(self, method: str) -> str:
        return self.labels.get(method, DEFAULT_LABELS.get(method, method))


def _pixels_to_uint8(video: torch.Tensor, scale: int = 8) -> np.ndarray:
    """`[F, 3, H, W]` in [-1, 1] -> `[F, H*scale, W*scale, 3]` uint8 (nearest-neighbour upscale)."""
    x = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    return x.permute(0, 2, 3, 1).numpy()


def _strip(video: torch.Tensor) -> np.ndarray:
    frames = _pixels_to_uint8(video)
    sep = np.full((frames.shape[1], 2, 3), 255, np.uint8)
    return np.concatenate([np.concatenate([f, sep], axis=1) for f in frames], axis=1)


def _reading_guide() -> list[str]:
    return [
        "How to read the numbers: every value comes with its 95% interval `[lo, hi]`. Samples are",
        "treated as independent Bernoulli draws (each has its own noise seed): rates get the Wilson score",
        "interval, means (RMSE, trajectory error, shade TV) a normal-approximation interval; a method",
        "*beats* another only when the two intervals do not overlap.",
        "*Coherence*: every frame coherent; *frame coherence*: the share of coherent frames, a frame being",
        f"coherent when it holds exactly one object, its size within {SIZE_TOLERANCE} px of the decoded",
        f"shape's footprint, that moved at most {MAX_SPEED} px per frame (+{JUMP_SLACK}) since the last such",
        "frame. *Trajectory error*: mean distance (px) of the object's centre from the asked prompt's true",
        f"path; a frame without an object counts {MISSING_DISTANCE:.1f} px (the frame's diagonal, more than",
        "any misplaced object). *Precision*: every attribute right and the nearest real clip within",
        f"RMSE {PRECISION_RMSE}.",
        "",
    ]


def _windows(results: Mapping) -> list[tuple[str, Mapping]]:
    """(title, summary) of the 12-frame held-out evaluation and of each long-rollout segment."""
    windows = [("held-out, 12 frames", results["heldout"]["summary"])]
    if "heldout_long" in results:
        total = len(results["heldout_long"]["summary"]["coherence_by_frame"])
        start = 1
        for seg in results["heldout_long"]["segments"]:
            length = len(seg["coherence_by_frame"])
            windows.append((f"{total} frames: {start}-{start + length - 1}", seg))
            start += length
    return windows


def _verdict(mine: Mapping, theirs: Mapping, key: str) -> str:
    if beats(mine, theirs, key):
        return "**beats**"
    return "loses to" if beats(theirs, mine, key) else "overlap"


def _verdict_tables(metrics: Mapping, inputs: ReportInputs) -> list[str]:
    """Self-Forcing DMD against every other student, per key and window: its verdict and their value."""
    others = [s for s in inputs.students if s != METHOD and s in metrics]
    mine = _windows(metrics[METHOD])
    lines = ["## Verdicts: Self-Forcing DMD against every other student (held-out prompts)", ""]
    lines += ["A cell says whether Self-Forcing DMD beats that student there (intervals apart), loses to it,",
              "or neither (the intervals overlap), then the student's value.", ""]  # fmt: skip
    for key in VERDICT_KEYS:
        lines += [
            f"### {key}",
            "",
            "| | " + " | ".join(t for t, _ in mine) + " |",
            "|---" * (len(mine) + 1) + "|",
        ]
        lines.append(
            f"| {inputs.label(METHOD)} | " + " | ".join(with_interval(s, key) for _, s in mine) + " |"
        )
        for other in others:
            theirs = dict(_windows(metrics[other]))
            cells = [
                f"{_verdict(s, theirs[t], key)} {with_interval(theirs[t], key)}" if t in theirs else "-"
                for t, s in mine
            ]
            lines.append(f"| {inputs.label(other)} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _targets(metrics: Mapping, inputs: ReportInputs) -> list[str]:
    """Each of the issue's targets for Self-Forcing DMD, met or missed, from the numbers."""
    sf = metrics[METHOD]["heldout"]["summary"]
    lines = ["## Targets (Self-Forcing DMD, held-out prompts)", ""]
    for key, target in TARGETS.items():
        ok = sf[key] >= target
        lines.append(f"- {key} = {with_interval(sf, key)} (target >= {target}): {'met' if ok else 'MISSED'}")
    ok = sf["shade_tv"] <= MAX_SHADE_TV
    lines.append(
        f"- shade_tv = {with_interval(sf, 'shade_tv')} (target <= {MAX_SHADE_TV}): {'met' if ok else 'MISSED'}"
    )
    rivals = [r for r in RIVALS if r in metrics and r in inputs.students]
    windows = _windows(metrics[METHOD])
    for key in VERDICT_KEYS if rivals else ():
        misses = []
        for r in rivals:
            theirs = dict(_windows(metrics[r]))
            where = [t for t, s in windows if t in theirs and not beats(s, theirs[t], key)]
            if where:
                misses.append(
                    f"{inputs.label(r)} ({'every window' if len(where) == len(windows) else '; '.join(where)})"
                )
        names = ", ".join(inputs.label(r) for r in rivals)
        verdict = "met" if not misses else "MISSED, not beaten: " + ", ".join(misses)
        lines.append(f"- {key}: beats {names} at 12 frames and in every 36-frame segment: {verdict}")
    return [*lines, ""]


def _base_section(base: Mapping) -> list[str]:
    """The base model's own samples and its x0 error against the exact teacher: every later stage
    inherits this quality."""
    lines = ["## Base model (bidirectional; every student starts from it)", ""]
    splits = [s for s in (*BASE_SPLITS, *sorted(set(base) - set(BASE_SPLITS) - {"x0_rmse"})) if s in base]
    table = {BASE_SPLITS.get(s, s): base[s]["summary"] for s in splits}
    if table:
        lines += [format_table(table, columns=COLUMNS, digits=2, intervals=True), ""]
    x0 = base.get("x0_rmse", {})
    if x0:
        ts = sorted({t for row in x0.values() for t in row}, key=float)
        lines += ["x0 RMSE against the exact teacher's posterior mean, per noise level t:", ""]
        lines += ["| prompts | " + " | ".join(f"t={t}" for t in ts) + " |", "|---" * (len(ts) + 1) + "|"]
        lines += [f"| {split} | " + " | ".join(f"{row[t]:.3f}" if t in row else "-" for t in ts) + " |"
                  for split, row in x0.items()]  # fmt: skip
        lines.append("")
    if BASE_TARGET_SPLIT in base:
        summary = base[BASE_TARGET_SPLIT]["summary"]
        for key, target in BASE_TARGETS.items():
            ok = summary[key] >= target
            lines.append(
                f"- base, {BASE_SPLITS[BASE_TARGET_SPLIT]}: {key} = {with_interval(summary, key)} "
                f"(target >= {target}): {'met' if ok else 'MISSED'}"
            )
    t, limit = MAX_BASE_X0_RMSE
    if t in x0.get("heldout", {}):
        ok = x0["heldout"][t] <= limit
        lines.append(
            f"- base x0 RMSE at t={t}, held-out = {x0['heldout'][t]:.3f} (target <= {limit}): "
            f"{'met' if ok else 'MISSED'}"
        )
    return [*lines, ""]


def _segment_tables(metrics: Mapping, methods: Sequence[str], inputs: ReportInputs) -> list[str]:
    lines = ["## Quality per 12-frame segment of 36-frame rollouts (held-out prompts)", ""]
    for key in VERDICT_KEYS:
        windows = {
            inputs.label(m): _windows(metrics[m])[1:] for m in methods if "heldout_long" in metrics.get(m, {})
        }
        if windows:
            lines += [f"### {key}", "", segment_table(windows, key), ""]
    return lines


def _figures(metrics: Mapping, methods: Sequence[str], inputs: ReportInputs, fig_dir: Path) -> list[str]:
    label = inputs.label
    present = [m for m in methods if m in metrics]
    long = {label(m): metrics[m]["heldout_long"]["segments"] for m in present if "heldout_long" in metrics[m]}
    short = {label(m): metrics[m]["heldout"]["summary"] for m in present if "heldout" in metrics[m]}
    base = metrics.get("base", {})
    base_rows = {f"{label('base')}, {BASE_SPLITS[s]}": base[s]["summary"] for s in ("heldout", "heldout_ode40")
                 if s in base}  # fmt: skip
    panels = {"held-out prompts, 12 frames": {**base_rows, **short}}
    if long:
        panels["held-out prompts, 36-frame rollouts"] = {
            label(m): metrics[m]["heldout_long"]["summary"] for m in present if "heldout_long" in metrics[m]
        }
    keys = ("all_attributes", "coherence", "frame_coherence", "precision", "all_shades_hit")
    made = [
        ("losses per stage", figures.loss_plot(inputs.loss_logs, fig_dir / "losses.png")),
        ("metrics", figures.bar_plot(short, keys, "held-out prompts, 12 frames", fig_dir / "metrics.png")),
        ("coherence per frame", figures.coherence_by_frame_plot(panels, fig_dir / "coherence_by_frame.png")),
    ]
    if long:
        made.append(("per segment", figures.segment_plot(long, VERDICT_KEYS, fig_dir / "segments.png")))
    lines = ["## Figures", ""]
    for name, path in made:
        lines += [f"![{name}]({path.relative_to(inputs.root).as_posix()})", ""]
    return lines


def _sample_strips(inputs: ReportInputs, fig_dir: Path) -> list[str]:
    """The same prompt and noise seed for every method: the first sample of up to 4 held-out prompts."""
    import imageio.v2 as imageio

    samples = torch.load(inputs.samples)
    lines = ["## Samples (same prompt and seed per row; held-out prompts)", ""]
    for i, prompt in enumerate(inputs.heldout_prompts[:4]):
        methods = [m for m in ("base", *inputs.students) if m in samples and i < len(samples[m])]
        if not methods:
            continue
        lines += [f"### {prompt.text}", ""]
        rows = {"data": render_prompt(prompt, samples[methods[0]].shape[1])[i % 3]}
        rows.update({m: samples[m][i] for m in methods})
        for m, video in rows.items():
            stem = f"{i}_{m}"
            imageio.imwrite(fig_dir / f"{stem}.png", _strip(video))
            imageio.mimwrite(fig_dir / f"{stem}.mp4", list(_pixels_to_uint8(video, 16)), fps=4,
                             codec="libx264", macro_block_size=1)  # fmt: skip
            lines.append(f"{inputs.label(m)}: ![{stem}](figures/{stem}.png) ([mp4](figures/{stem}.mp4))  ")
        lines.append("")
    return lines


def write_report(inputs: ReportInputs) -> Path:
    """Write `<root>/report.md` and `<root>/figures/`; returns the report's path."""
    metrics = json.loads(Path(inputs.metrics).read_text())
    missing = [m for m in ("data", METHOD) if m not in metrics]
    if missing:
        raise ValueError(f"write_report: {inputs.metrics} has no results for {missing}")
    root = Path(inputs.root)
    fig_dir = root / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    methods = ["data", *inputs.students]

    lines = [f"# Shapes world: the Self-Forcing recipe end to end ({inputs.profile} profile)", ""]
    lines += [f"Machine: {inputs.machine}.", ""]
    if inputs.world:
        lines += [f"World: {inputs.world}.", ""]
    lines += ["| stage | wall time (s) |", "|---|---|"]
    lines += [f"| {stage} | {'-' if t is None else f'{t:.0f}'} |" for stage, t in inputs.stage_times.items()]
    lines += ["", *_reading_guide()]
    if "base" in metrics:
        lines += _base_section(metrics["base"])
    lines += _targets(metrics, inputs)
    lines += _verdict_tables(metrics, inputs)
    for split, title in SPLITS.items():
        table = {
            inputs.label(m): metrics[m][split]["summary"] for m in methods if split in metrics.get(m, {})
        }
        if table:
            lines += [f"## {title}", "", format_table(table, columns=COLUMNS, digits=2, intervals=True), ""]
    lines += _segment_tables(metrics, methods, inputs)
    if inputs.continuation is not None:
        lines += continuation_section(
            inputs.continuation, inputs.continuation_samples, inputs.label, root, fig_dir
        )
    lines += _figures(metrics, methods, inputs, fig_dir)
    lines += _sample_strips(inputs, fig_dir)
    out = root / "report.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    return out
