"""inference.py and scripts/export_checkpoint.py refuse what a user can fix the way train.py does:
exit code 2 and one `error: ...` line on stderr that names the culprit, never a traceback.

Each case runs the script in its own process (the exit code and the whole stderr are the contract)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist_helpers import subprocess_env
from utils.errors import USER_ERROR_EXIT_CODE
from wan import WanConfig
from wan.toy import toy_dit_state_dict
from wan.weights import write_self_forcing_pt

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], env=subprocess_env(), cwd=cwd, capture_output=True, text=True, timeout=240
    )


def _one_error_line(proc: subprocess.CompletedProcess, *culprits: str) -> str:
    """The process failed as a user error: rc 2, stderr is exactly one `error:` line naming each culprit."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == USER_ERROR_EXIT_CODE, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Bad checkpoints of every kind, and a run (ema_start_step=5) whose EMA has not started at step 1."""
    d = tmp_path_factory.mktemp("ckpts")
    sd = toy_dit_state_dict(WanConfig.preset("tiny"))
    write_self_forcing_pt(d / "no_ema.pt", generator=sd)
    write_self_forcing_pt(
        d / "other_net.pt", generator={k: v for k, v in sd.items() if not k.startswith("head.")}
    )
    torch.save({"generator": sd, "args": argparse.Namespace(lr=1.0)}, d / "pickled.pt")
    (d / "empty.pt").write_bytes(b"")
    (d / "empty_dir").mkdir()
    (d / "run_without_checkpoints" / "checkpoints").mkdir(parents=True)
    (d / "prompts.txt").write_text("a cat\n")
    proc = _run(["train.py", "--config", "configs/tiny_dmd.yaml", "--logdir", str(d / "early"), "max_steps=1",
                 "sample_every=0", "ema_start_step=5", "wandb_mode=disabled"], ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d


@pytest.mark.parametrize(
    "flags, culprits",
    [
        (["--checkpoint", "missing.pt"], ["--checkpoint", "missing.pt", "not found"]),
        (["--checkpoint", "empty_dir"], ["--checkpoint", "empty_dir", "safetensors"]),
        (["--checkpoint", "empty.pt"], ["--checkpoint", "empty.pt", "not a readable torch checkpoint"]),
        (["--checkpoint", "run_without_checkpoints"], ["run_without_checkpoints", "no complete checkpoint"]),
        (
            ["--checkpoint", "other_net.pt"],
            ["--checkpoint", "other_net.pt", "missing keys", "head.head.weight"],
        ),
        (
            ["--checkpoint", "pickled.pt"],
            ["--checkpoint", "pickled.pt", "weights_only", "argparse.Namespace"],
        ),
        (["--checkpoint", "no_ema.pt", "--use_ema"], ["no_ema.pt", "'generator_ema'"]),
        (["--checkpoint", "early", "--use_ema", "0.5"], ["early", "no EMA at rate 0.5", "[0.99]"]),
    ],
    ids=[
        "missing",
        "empty-dir",
        "empty-file",
        "run-without-checkpoints",
        "mismatched",
        "pickle",
        "pt-no-ema",
        "ema-rate",
    ],  # fmt: skip
)
def test_inference_user_errors_are_one_line_exit_2(files, flags, culprits):
    args = [str(ROOT / "inference.py"), "--config", str(ROOT / "configs/tiny_dmd.yaml"), "--data_path",
            "prompts.txt", "--output_folder", "videos", "--num_output_frames", "3", *flags]  # fmt: skip
    _one_error_line(_run(args, files), *culprits)
    assert not list((files / "videos").glob("*.mp4"))


@pytest.mark.parametrize(
    "flags, culprits",
    [
        (["--logdir", "missing"], ["missing", "no complete checkpoint"]),
        (["--logdir", "run_without_checkpoints"], ["run_without_checkpoints", "no complete checkpoint"]),
        (["--logdir", "early", "--use_ema", "0.99"], ["--use_ema 0.99", "ema_start_step=5", "step 1"]),
        (["--logdir", "early", "--use_ema", "0.5"], ["early", "no EMA at rate 0.5", "[0.99]"]),
    ],
    ids=["missing", "run-without-checkpoints", "ema-not-started", "ema-rate"],
)
def test_export_user_errors_are_one_line_exit_2(files, flags, culprits):
    proc = _run([str(ROOT / "scripts/export_checkpoint.py"), "--output", "exported", *flags], files)
    _one_error_line(proc, *culprits)
    assert not (files / "exported" / "model.pt").exists()
