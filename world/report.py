"""`report.md` of a shapes-world chain: tables per method, plots, sample strips and mp4s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .evaluate import format_table
from .render import Prompt, render_prompt

if TYPE_CHECKING:
    from .chain import Chain

COLUMNS = ("all_attributes", "colour", "shape", "direction", "speed", "coherence", "precision", "rmse",
           "all_shades_hit", "shade_tv", "shade_counts")  # fmt: skip
TARGETS = {"all_attributes": 0.9, "coherence": 0.9, "precision": 0.8, "all_shades_hit": 1.0}
SPLITS = {
    "heldout": "Held-out prompts, 12 frames (the training length)",
    "train": "Training prompts, 12 frames",
    "heldout_long": "Held-out prompts, 36 frames (3x, rolling KV window of 12 frames with a 3-frame sink)",
}


def _pixels_to_uint8(video: torch.Tensor, scale: int = 8) -> np.ndarray:
    """`[F, 3, H, W]` in [-1, 1] -> `[F, H*scale, W*scale, 3]` uint8 (nearest-neighbour upscale)."""
    x = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    return x.permute(0, 2, 3, 1).numpy()


def _strip(video: torch.Tensor) -> np.ndarray:
    frames = _pixels_to_uint8(video)
    sep = np.full((frames.shape[1], 2, 3), 255, np.uint8)
    return np.concatenate([np.concatenate([f, sep], axis=1) for f in frames], axis=1)


def _loss_plot(chain: Chain, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ["base", "ode", "sf_dmd", *chain.profile.baselines]
    fig, axes = plt.subplots(1, len(stages), figsize=(3.2 * len(stages), 2.8))
    for ax, stage in zip(np.atleast_1d(axes), stages, strict=True):
        path = chain.stage_dir(stage) / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        for key in ("generator_loss", "critic_loss"):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=key.replace("_loss", ""), lw=0.8)
        ax.set_title(stage, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _bar_plot(metrics: dict, methods: list[str], labels: dict[str, str], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("all_attributes", "coherence", "precision", "all_shades_hit")
    fig, ax = plt.subplots(figsize=(9, 3.2))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        vals = [metrics[m]["heldout"]["summary"][k] for k in keys]
        ax.bar(np.arange(len(keys)) + i * width, vals, width, label=labels[m])
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, keys)
    ax.set_ylim(0, 1.05)
    ax.set_title("held-out prompts, 12 frames")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _segment_plot(metrics: dict, methods: list[str], labels: dict[str, str], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key in zip(axes, ("all_attributes", "coherence"), strict=True):
        for m in methods:
            seg = [s[key] for s in metrics[m]["heldout_long"]["segments"]]
            ax.plot(range(1, len(seg) + 1), seg, marker="o", label=labels[m])
        ax.set_xlabel("12-frame segment of a 36-frame rollout")
        ax.set_title(key)
        ax.set_ylim(0, 1.05)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _verdicts(metrics: dict, students: list[str]) -> list[str]:
    """Each target of the issue, met or missed, from the numbers."""
    sf = metrics["sf_dmd"]["heldout"]["summary"]
    lines = []
    for key, target in TARGETS.items():
        ok = sf[key] >= target
        lines.append(
            f"- Self-Forcing DMD {key} = {sf[key]:.2f} (target >= {target}): {'met' if ok else 'MISSED'}"
        )
        lines[-1] = lines[-1].replace("all_shades_hit", "share of prompts with every shade hit")
    ok = sf["shade_tv"] <= 0.3
    lines.append(
        f"- shade distance to the data = {sf['shade_tv']:.2f} (target <= 0.3): {'met' if ok else 'MISSED'}"
    )
    for split in ("heldout", "heldout_long"):
        for key in ("all_attributes", "coherence"):
            mine = metrics["sf_dmd"][split]["summary"][key]
            others = {s: metrics[s][split]["summary"][key] for s in students if s != "sf_dmd"}
            beaten = [s for s, v in others.items() if mine > v]
            lost = [s for s, v in others.items() if mine <= v]
            lines.append(
                f"- {split} {key}: Self-Forcing DMD {mine:.2f} beats {', '.join(beaten) or 'none'}"
                + (f"; does NOT beat {', '.join(f'{s} ({others[s]:.2f})' for s in lost)}" if lost else "")
            )
    return lines


def write_report(chain: Chain) -> Path:
    import imageio.v2 as imageio

    from .chain import LABELS

    root = chain.root
    fig_dir = root / "figures"
    fig_dir.mkdir(exist_ok=True)
    metrics = json.loads((chain.stage_dir("eval") / "metrics.json").read_text())
    students = chain.students()
    methods = ["data", *students]

    lines = [f"# Shapes world: the Self-Forcing recipe end to end ({chain.profile.name} profile)", ""]
    lines += [f"Machine: {chain.machine()}.", ""]
    lines += ["| stage | wall time (s) |", "|---|---|"]
    for stage in ("data", "base", "ode_pairs", "ode", "sf_dmd", *chain.profile.baselines, "eval"):
        t = chain.wall_time(stage)
        lines.append(f"| {stage} | {'-' if t is None else f'{t:.0f}'} |")
    lines += ["", "## Targets", "", *_verdicts(metrics, students), ""]
    for split, title in SPLITS.items():
        table = {LABELS[m]: metrics[m][split]["summary"] for m in methods}
        lines += [f"## {title}", "", format_table(table, columns=COLUMNS), ""]
    lines += ["## Quality per 12-frame segment of 36-frame rollouts (held-out prompts)", ""]
    for m in methods:
        segs = metrics[m]["heldout_long"]["segments"]
        cells = " / ".join(f"{s['all_attributes']:.2f}, {s['coherence']:.2f}" for s in segs)
        lines.append(f"- {LABELS[m]} (all attributes, coherence per segment): {cells}")
    lines += ["", "## Figures", ""]
    for name, path in (
        ("losses per stage", _loss_plot(chain, fig_dir / "losses.png")),
        ("metrics", _bar_plot(metrics, methods, LABELS, fig_dir / "metrics.png")),
        ("per segment", _segment_plot(metrics, methods, LABELS, fig_dir / "segments.png")),
    ):
        lines += [f"![{name}]({path.relative_to(root)})", ""]

    # Sample strips: the same prompt and noise seed for every method (first sample of 4 held-out prompts).
    samples = torch.load(chain.stage_dir("eval") / "samples.pt")
    prompts: list[Prompt] = chain.eval_prompts()["heldout"][:4]
    lines += ["## Samples (same prompt and seed per row; held-out prompts)", ""]
    for i, prompt in enumerate(prompts):
        lines += [f"### {prompt.text}", ""]
        rows = {"data": render_prompt(prompt, 12)[i % 3]}
        rows.update({m: samples[m][i] for m in students if m in samples and i < len(samples[m])})
        for m, video in rows.items():
            stem = f"{i}_{m}"
            imageio.imwrite(fig_dir / f"{stem}.png", _strip(video))
            imageio.mimwrite(fig_dir / f"{stem}.mp4", list(_pixels_to_uint8(video, 16)), fps=4,
                             codec="libx264", macro_block_size=1)  # fmt: skip
            lines.append(f"{LABELS[m]}: ![{stem}](figures/{stem}.png) ([mp4](figures/{stem}.mp4))  ")
        lines.append("")
    out = root / "report.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    return out
