"""The shapes-world report's figures: losses per stage, metrics with their 95% intervals, quality per
segment of long rollouts and coherence frame by frame. Each function writes one PNG and returns its path.

`metrics` is the evaluation's metrics.json: `{method: {split: {"summary": {...}, "segments": [...]}}}`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    _pyplot().close(fig)
    return out


def _errors(summaries: Sequence[Mapping], key: str) -> tuple[list[float], np.ndarray]:
    """Values of `key` and their asymmetric error bars `[2, n]` from `<key>_ci` (unbounded -> 0)."""
    values = [s[key] for s in summaries]
    ci = np.array([s[f"{key}_ci"] for s in summaries], dtype=float).reshape(-1, 2)
    bars = np.stack([np.asarray(values) - ci[:, 0], ci[:, 1] - np.asarray(values)])
    return values, np.nan_to_num(bars, posinf=0.0, neginf=0.0).clip(min=0.0)


def loss_plot(loss_logs: Mapping[str, Path], out: Path) -> Path:
    """Generator and critic losses of each training stage (its metrics.jsonl; a missing log is empty)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(loss_logs), figsize=(3.2 * len(loss_logs), 2.8), squeeze=False)
    for ax, (stage, path) in zip(axes[0], loss_logs.items(), strict=True):
        rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
        for key in ("generator_loss", "critic_loss"):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=key.replace("_loss", ""), lw=0.8)
        ax.set_title(stage, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_yscale("symlog", linthresh=1e-3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(fig, out)


def bar_plot(summaries: Mapping[str, Mapping], keys: Sequence[str], title: str, out: Path) -> Path:
    """One group of bars per key, one bar per method (label -> summary), with 95% intervals."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.4))
    width = 0.8 / len(summaries)
    for i, (label, summary) in enumerate(summaries.items()):
        values = [summary[k] for k in keys]
        bars = np.concatenate([_errors([summary], k)[1] for k in keys], axis=1)
        ax.bar(np.arange(len(keys)) + i * width, values, width, yerr=bars, capsize=2, label=label)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, keys)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{title} (bars: 95% intervals)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out)


def segment_plot(segments: Mapping[str, Sequence[Mapping]], keys: Sequence[str], out: Path) -> Path:
    """Each key per segment of the long rollouts, one line per method (label -> segment summaries)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.3 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for label, segs in segments.items():
            values, bars = _errors(segs, key)
            ax.errorbar(range(1, len(segs) + 1), values, yerr=bars, marker="o", capsize=2, label=label)
        ax.set_xticks(range(1, max(len(segs) for segs in segments.values()) + 1))
        ax.set_xlabel("12-frame segment of the rollout", fontsize=8)
        ax.set_title(key, fontsize=9)
    axes[0, 0].legend(fontsize=6)
    return _save(fig, out)


def coherence_by_frame_plot(panels: Mapping[str, Mapping[str, Mapping]], out: Path) -> Path:
    """One figure: per panel (title -> {label: summary}) the share of coherent samples at every frame
    index, a shaded 95% band around each line; dashed lines are the base model's own samples."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.4), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels.items(), strict=True):
        for label, summary in rows.items():
            rate = summary["coherence_by_frame"]
            ci = np.array(summary["coherence_by_frame_ci"], dtype=float).reshape(-1, 2)
            frames = np.arange(1, len(rate) + 1)
            (line,) = ax.plot(frames, rate, ls="--" if label.startswith("base") else "-", lw=1, label=label)
            ax.fill_between(frames, ci[:, 0], ci[:, 1], color=line.get_color(), alpha=0.1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("frame", fontsize=8)
        ax.set_ylabel("coherent samples", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6)
    return _save(fig, out)
