"""The shapes-world report renders from a tiny synthetic metrics.json, with and without the base model's
entry, and its verdicts follow how the synthetic methods were built: perfect clips beat noise, equal
clips overlap, clips shifted by one pixel lose on trajectory error and precision."""

from __future__ import annotations

import ast
import json
from statistics import NormalDist

import pytest
import torch

from world.evaluate import evaluate
from world.render import Clip, Prompt, render
from world.report import ReportInputs, write_report

from .dist_helpers import REPO_ROOT

# Vertical motion keeps the object at the centre column, so a 1-px horizontal shift stays in frame.
PROMPTS = [Prompt("red", "square", "up", "slow"), Prompt("green", "circle", "down", "fast")]
PER_PROMPT = 4
N = len(PROMPTS) * PER_PROMPT
LABELS = {"ode": "ODE init", "sf_dmd": "Self-Forcing DMD", "dmd_teacher_forcing": "DMD, teacher forcing"}


def _videos(kind: str, frames: int) -> torch.Tensor:
    clips = torch.stack([render(Clip(p, i % 3), frames) for p in PROMPTS for i in range(PER_PROMPT)])
    if kind == "real":
        return clips
    if kind == "shifted":
        return clips.roll(1, dims=-1)  # one pixel right; the wrapped column is background
    return torch.rand(clips.shape, generator=torch.Generator().manual_seed(frames)) * 2 - 1


def _results(kind: str, splits: dict[str, int]) -> dict:
    asked = [p for p in PROMPTS for _ in range(PER_PROMPT)]
    out = {}
    for split, frames in splits.items():
        ev = evaluate(_videos(kind, frames), asked)
        out[split] = {"summary": ev.summary(), "segments": ev.per_segment()}
    return out


STUDENT_SPLITS = {"heldout": 12, "train": 12, "heldout_long": 36}


@pytest.fixture(scope="module")
def metrics() -> dict:
    return {
        "data": _results("real", STUDENT_SPLITS),
        "ode": _results("noise", STUDENT_SPLITS),
        "sf_dmd": _results("shifted", STUDENT_SPLITS),
        "dmd_teacher_forcing": _results("real", STUDENT_SPLITS),
    }


def _write(tmp_path, metrics: dict) -> str:
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    samples = {m: _videos(k, 12)[::PER_PROMPT] for m, k in (("ode", "noise"), ("sf_dmd", "shifted"))}
    samples["dmd_teacher_forcing"] = _videos("real", 12)[::PER_PROMPT]
    torch.save(samples, tmp_path / "samples.pt")
    (tmp_path / "base.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "generator_loss": 1 / s}) for s in (1, 2))
    )
    inputs = ReportInputs(
        root=tmp_path,
        profile="synthetic",
        machine="test machine",
        metrics=tmp_path / "metrics.json",
        samples=tmp_path / "samples.pt",
        students=["ode", "sf_dmd", "dmd_teacher_forcing"],
        heldout_prompts=PROMPTS[:1],  # one row of strips and mp4s (ffmpeg is the slow part)
        stage_times={"base": 12.0, "ode": None},
        loss_logs={"base": tmp_path / "base.jsonl", "ode": tmp_path / "missing.jsonl"},
        labels=LABELS,
    )
    out = write_report(inputs)
    for name in ("losses", "metrics", "coherence_by_frame", "segments", "0_sf_dmd", "0_data"):
        assert (tmp_path / "figures" / f"{name}.png").stat().st_size > 0, name
    assert (tmp_path / "figures" / "0_sf_dmd.mp4").stat().st_size > 0
    return out.read_text()


def _row(report: str, heading: str, label: str) -> list[str]:
    """The cells of the row `label` in the table under `heading`."""
    section = report.split(f"\n{heading}\n", 1)[1].split("\n\n", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} under {heading!r}")


def test_report_without_base_shows_verdicts_from_the_intervals(tmp_path, metrics):
    report = _write(tmp_path, metrics)
    assert "## Base model" not in report
    # 4 windows: held-out 12 frames and the 3 segments of the 36-frame rollouts.
    noise, equal = (_row(report, "### all_attributes", LABELS[m]) for m in ("ode", "dmd_teacher_forcing"))
    assert len(noise) == 4 and all(c.startswith("**beats**") for c in noise)
    assert all(c.startswith("overlap") for c in equal)
    # Coherence too: the shifted clips are as coherent as the real ones, noise never is.
    noise, equal = (_row(report, "### coherence", LABELS[m]) for m in ("ode", "dmd_teacher_forcing"))
    assert all(c.startswith("**beats**") for c in noise) and all(c.startswith("overlap") for c in equal)
    # Shifted by one pixel: trajectory error exactly 1 against 0, precision 0 against 1.
    for key in ("trajectory_error", "precision"):
        assert all(
            c.startswith("loses to") for c in _row(report, f"### {key}", LABELS["dmd_teacher_forcing"])
        )
    assert _row(report, "### trajectory_error", "Self-Forcing DMD")[0] == "1.00 [1.00, 1.00]"
    # Every rate with its Wilson interval: all N right -> [N / (N + z^2), 1].
    z = NormalDist().inv_cdf(0.975)
    held_out = _row(report, "## Held-out prompts, 12 frames (the training length)", "data (real clips)")
    assert held_out[0] == f"1.00 [{N / (N + z * z):.2f}, 1.00]"
    assert "- all_attributes: beats ODE init, DMD, teacher forcing" in report
    assert "MISSED, not beaten: DMD, teacher forcing (every window)" in report


def test_report_shows_the_base_first_when_present(tmp_path, metrics):
    base = _results("real", {"heldout": 12, "train": 12, "heldout_ode40": 12, "train_ode40": 12})
    base["x0_rmse"] = {"heldout": {"200": 0.02, "500": 0.04, "800": 0.1}, "train": {"200": 0.01, "500": 0.03}}
    report = _write(tmp_path, {**metrics, "base": base})
    sections = [line for line in report.splitlines() if line.startswith("## ")]
    assert sections[0] == "## Base model (bidirectional; every student starts from it)"
    heading = "## Base model (bidirectional; every student starts from it)"
    assert _row(report, heading, "held-out prompts, 40-step ODE")[0].startswith("1.00 [")
    x0 = report.split("x0 RMSE against", 1)[1]
    assert "| prompts | t=200 | t=500 | t=800 |" in x0 and "| train | 0.010 | 0.030 | - |" in x0
    assert "- base x0 RMSE at t=500, held-out = 0.040 (target <= 0.05): met" in report
    assert "coherence = 1.00" in report.split("## Targets", 1)[0]


def test_report_does_not_import_the_chain():
    """No import path from world.report reaches world.chain (the cycle issue 15 asked to remove)."""
    world = REPO_ROOT / "world"
    seen, todo = set(), ["report"]
    while todo:
        name = todo.pop()
        if name in seen or not (world / f"{name}.py").is_file():
            continue
        seen.add(name)
        for node in ast.walk(ast.parse((world / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and (
                node.level == 1 or (node.module or "").startswith("world")
            ):
                module = (node.module or "").removeprefix("world").lstrip(".")
                todo += [module.split(".")[0]] if module else [a.name for a in node.names]
    assert "figures" in seen and "evaluate" in seen  # the walk follows the package's imports
    assert "chain" not in seen


def test_missing_method_is_named(tmp_path, metrics):
    (tmp_path / "m.json").write_text(json.dumps({"data": metrics["data"]}))
    inputs = ReportInputs(tmp_path, "p", "m", tmp_path / "m.json", tmp_path / "s.pt", [], [], {}, {})
    with pytest.raises(ValueError, match=r"no results for \['sf_dmd'\]"):
        write_report(inputs)
