"""Pool the evaluations of several chain runs (run roots) that differ only in training seeds.

    python3 -m world.seeds runs/world_full runs/world_full_seed4 runs/world_full_seed5 --out runs/seeds.md

One run's report judges one draw of every stage's training noise; a claim such as "Self-Forcing DMD
beats teacher forcing" should hold over several. This reads each root's `eval/metrics.json` (and
`eval/continuation.json` when present) and writes, per student, each seed's value and the pooled one:
every sample of every seed taken as an independent draw of the method, which is what `world.evaluate`
would report on the concatenated samples (the pooled rate is the sample-weighted mean of the rates,
its Wilson interval over all samples; a pooled mean and its normal interval come from each seed's
mean, count and spread). The pooled interval does not widen for differences *between* seeds, so the
verdict table also counts the seeds on which Self-Forcing DMD wins on its own.

Sample counts and spreads are recovered from what every summary already holds: the number of
samples is the sum of `shade_counts` (each sample has one nearest shade) or a continuation summary's
`n`; a mean's sample standard deviation is its interval's half-width * sqrt(n) / z
(`world.stats.mean_interval` inverted). Keys counted over prompts rather than samples (shades hit,
shade TV) are not pooled: their prompt counts are not in the summary.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from .chain import LABELS
from .report import METHOD, VERDICT_KEYS, _verdict, _windows
from .stats import Z95, beats, wilson_interval, with_interval

# Sample-level keys of a `world.evaluate` summary: rates (Wilson) and means (normal interval).
RATE_KEYS = ("colour", "shape", "direction", "speed", "all_attributes", "coherence", "frame_coherence",
             "precision")  # fmt: skip
MEAN_KEYS = ("trajectory_error", "rmse")
# A `world.continuation_eval` window's summary.
CONTINUATION_RATES = ("accuracy", "shade_kept")
CONTINUATION_MEANS = ("rmse",)
TABLE_KEYS = (*VERDICT_KEYS, "rmse")


def sample_count(summary: Mapping) -> int:
    """Samples behind a summary: a continuation summary's `n`, else the sum of `shade_counts`."""
    if "n" in summary:
        return int(summary["n"])
    if "shade_counts" in summary:
        return int(sum(summary["shade_counts"]))
    raise ValueError(
        "sample_count: the summary has neither 'n' nor 'shade_counts' (not written by world.evaluate?)"
    )


def _sum_of_squares(summary: Mapping, key: str, n: int) -> float:
    """(n - 1) s^2 of the samples behind a mean, s from its normal interval (one sample: 0)."""
    if n < 2:
        return 0.0
    lo, hi = summary[f"{key}_ci"]
    return (n - 1) * ((hi - lo) / 2 * math.sqrt(n) / Z95) ** 2


def pool(
    summaries: Sequence[Mapping], rates: Sequence[str] = RATE_KEYS, means: Sequence[str] = MEAN_KEYS
) -> dict:
    """One summary of all samples behind `summaries` (same keys, with `_ci`, plus `n` and per-frame
    coherence when every summary has it); `shade_counts` are added up."""
    if not summaries:
        raise ValueError("pool: no summaries")
    ns = [sample_count(s) for s in summaries]
    total = sum(ns)

    def weighted(values) -> float:  # the mean over all samples of per-run means `values`
        return math.fsum(v * n for v, n in zip(values, ns)) / total

    def interval(rate: float) -> list[float]:  # rounding can put a pooled 1.0 a hair above 1
        return list(wilson_interval(min(max(rate, 0.0), 1.0), total))

    out: dict = {"n": total}
    for key in rates:
        if all(key in s for s in summaries):
            out[key] = weighted(s[key] for s in summaries)
            out[f"{key}_ci"] = interval(out[key])
    for key in means:
        if all(key in s for s in summaries):
            m = weighted(s[key] for s in summaries)
            # Sum of squares about the pooled mean: each run's own, plus n (its mean - m)^2.
            ss = math.fsum(_sum_of_squares(s, key, n) + n * (s[key] - m) ** 2 for s, n in zip(summaries, ns))
            half = Z95 * math.sqrt(ss / (total - 1)) / math.sqrt(total) if total > 1 else math.inf
            out[key], out[f"{key}_ci"] = m, [m - half, m + half]
    if all("shade_counts" in s for s in summaries):
        out["shade_counts"] = [sum(c) for c in zip(*(s["shade_counts"] for s in summaries))]
    if (
        all("coherence_by_frame" in s for s in summaries)
        and len({len(s["coherence_by_frame"]) for s in summaries}) == 1
    ):
        by_frame = [weighted(frame) for frame in zip(*(s["coherence_by_frame"] for s in summaries))]
        out["coherence_by_frame"] = by_frame
        out["coherence_by_frame_ci"] = [interval(p) for p in by_frame]
    return out


def _world_line(root: Path) -> str | None:
    report = root / "report.md"
    if report.is_file():
        for line in report.read_text(encoding="utf-8").splitlines():
            if line.startswith("World: "):
                return line
    return None


def _load(roots: Sequence[Path]) -> tuple[list[dict], list[dict | None], str | None]:
    """Each root's metrics and continuation results (None: none), and their common "World:" line."""
    if len(roots) < 2:
        raise ValueError(f"world.seeds: give at least two run roots, got {len(roots)}")
    metrics, continuation = [], []
    for root in roots:
        path = root / "eval" / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"world.seeds: {path} is missing (has the chain's eval stage run in {root}?)"
            )
        metrics.append(json.loads(path.read_text()))
        cont = root / "eval" / "continuation.json"
        continuation.append(json.loads(cont.read_text()) if cont.is_file() else None)
    worlds = [_world_line(r) for r in roots]
    if len(set(worlds)) > 1:
        lines = "; ".join(f"{r}: {w or 'no World line'}" for r, w in zip(roots, worlds))
        raise ValueError(f"world.seeds: the roots were run in different worlds, nothing to pool: {lines}")
    missing = [str(r) for r, m in zip(roots, metrics) if METHOD not in m]
    if missing:
        raise ValueError(f"world.seeds: no {METHOD} results in {missing}")
    return metrics, continuation, worlds[0]


def _students(metrics: Sequence[Mapping]) -> list[str]:
    """Students evaluated in every root, in the first root's order (Self-Forcing DMD first)."""
    common = [m for m in metrics[0] if m not in ("data", "base") and all(m in other for other in metrics)]
    return [METHOD, *(m for m in common if m != METHOD)]


def _label(method: str) -> str:
    return LABELS.get(method, method)


def _pooled_windows(per_root: Sequence[Mapping]) -> list[tuple[str, dict, list[Mapping]]]:
    """(title, pooled summary, per-root summaries) of the 12-frame held-out window and each long segment."""
    titled = [dict(_windows(results)) for results in per_root]
    titles = [t for t, _ in _windows(per_root[0]) if all(t in w for w in titled)]
    return [(t, pool([w[t] for w in titled]), [w[t] for w in titled]) for t in titles]


def _fmt(summary: Mapping, key: str) -> str:
    return f"{summary[key]:.2f}" if key in summary else "-"


def seeds_report(roots: Sequence[Path]) -> str:
    """The pooled tables and verdicts of `roots` as markdown."""
    roots = [Path(r) for r in roots]
    metrics, continuation, world = _load(roots)
    students = _students(metrics)
    windows = {s: _pooled_windows([m[s] for m in metrics]) for s in students}
    lines = [f"# Shapes world: {len(roots)} runs pooled", "", "Roots (seed order below):", ""]
    lines += [f"{i + 1}. `{r}`" for i, r in enumerate(roots)]
    lines += ["", *([world, ""] if world else [])]
    lines += [
        "Pooled: every sample of every run an independent draw of the method (95% intervals in brackets);",
        "the intervals do not include the spread between training seeds, which the per-run values show.",
        "",
        "## Held-out prompts, 12 frames: pooled, then each run",
        "",
    ]
    held = {s: windows[s][0] for s in students}
    lines += ["| | n | " + " | ".join(TABLE_KEYS) + " | shades (pooled) | "
              + " | ".join(f"{k} per run" for k in ("all_attributes", "coherence")) + " |",
              "|---" * (len(TABLE_KEYS) + 5) + "|"]  # fmt: skip
    for s in students:
        _, pooled, per_run = held[s]
        cells = [with_interval(pooled, k) for k in TABLE_KEYS]
        shades = "/".join(map(str, pooled.get("shade_counts", [])))
        runs = [" / ".join(_fmt(r, k) for r in per_run) for k in ("all_attributes", "coherence")]
        lines.append(
            f"| {_label(s)} | {pooled['n']} | "
            + " | ".join(cells)
            + f" | {shades} | "
            + " | ".join(runs)
            + " |"
        )
    lines += ["", "## Verdicts: Self-Forcing DMD against every other student, pooled", ""]
    lines += [
        "A cell: the pooled verdict (intervals apart or not), the other student's pooled value, and on how",
        "many runs Self-Forcing DMD beats it on that run's own samples.",
        "",
    ]
    mine = windows[METHOD]
    for key in VERDICT_KEYS:
        lines += [
            f"### {key}",
            "",
            "| | " + " | ".join(t for t, _, _ in mine) + " |",
            "|---" * (len(mine) + 1) + "|",
        ]
        lines.append(f"| {_label(METHOD)} | " + " | ".join(with_interval(p, key) for _, p, _ in mine) + " |")
        for other in students[1:]:
            theirs = {t: (p, runs) for t, p, runs in windows[other]}
            cells = []
            for title, p, runs in mine:
                if title not in theirs:
                    cells.append("-")
                    continue
                q, their_runs = theirs[title]
                wins = sum(beats(a, b, key) for a, b in zip(runs, their_runs))
                cells.append(f"{_verdict(p, q, key)} {with_interval(q, key)} (runs: {wins}/{len(runs)})")
            lines.append(f"| {_label(other)} | " + " | ".join(cells) + " |")
        lines.append("")
    if all(c is not None for c in continuation):
        lines += _continuation_lines(continuation)
    return "\n".join(lines)


def _continuation_lines(continuation: Sequence[Mapping]) -> list[str]:
    """Pooled continuation accuracy per student and setting (a student judged in only some settings,
    e.g. the I2V ones from the first frame, gets "-" in the others)."""
    methods = [
        m for m in continuation[0] if m not in ("settings", "data") and all(m in c for c in continuation)
    ]
    settings: list[str] = []
    for m in methods:
        settings += [s for s in continuation[0][m] if s not in settings]
    lines = ["## Continuation (world.continuation_eval), pooled", ""]
    lines += ["| | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
    for m in methods:
        cells = []
        for s in settings:
            if not all(s in c[m] for c in continuation):
                cells.append("-")
                continue
            per_run = [c[m][s]["summary"] for c in continuation]
            pooled = pool(per_run, CONTINUATION_RATES, CONTINUATION_MEANS)
            runs = " / ".join(_fmt(r, "accuracy") for r in per_run)
            cells.append(f"accuracy {with_interval(pooled, 'accuracy')} (runs {runs}), n {pooled['n']}")
        lines.append(f"| {_label(m)} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python3 -m world.seeds", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "roots", nargs="+", type=Path, help="run roots of scripts/world_chain.py (each with eval/)"
    )
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = p.parse_args(argv)
    text = seeds_report(args.roots)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
