"""inference.py and scripts/export_checkpoint.py on the toy networks: formats in, mp4 + summary out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch

from tests.dist_helpers import free_port, subprocess_env
from utils.checkpoint import read_run_model
from wan import WanConfig
from wan.toy import toy_dit_state_dict
from wan.weights import read_dit_weights, strip_wrapper_prefixes, write_self_forcing_pt

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a cat / on a roof", "waves at sunset " * 20, "a red car"]  # a slash and a very long prompt


def _run(args: list[str], nproc: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    env = subprocess_env()
    launcher = [sys.executable]
    if nproc > 1:
        launcher += [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
        ]
    return subprocess.run(
        [*launcher, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def _infer(tmp_path: Path, out: str, extra: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = ["inference.py", "--config", "configs/tiny_dmd.yaml", "--data_path", str(prompts)]
    return _run([*args, "--output_folder", str(tmp_path / out), "--num_output_frames", "3", *extra], nproc)


def _check_outputs(folder: Path, frames_per_video: int) -> dict:
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["vae_decode_included"] is True
    assert sorted(v["index"] for v in summary["videos"]) == list(range(len(PROMPTS)))
    for v in summary["videos"]:
        assert "/" not in v["file"] and len(v["file"]) < 80
        assert iio.imread(folder / v["file"]).shape[0] == frames_per_video == v["pixel_frames"]
        assert len(v["block_latency_s"]) == 1 and v["fps"] > 0
    assert len(list(folder.glob("*.mp4"))) == len(PROMPTS)
    return summary


def test_upstream_pt_checkpoint_writes_playable_videos(tmp_path):
    ckpt = tmp_path / "self_forcing_dmd.pt"
    sd = toy_dit_state_dict(WanConfig.preset("tiny"))
    write_self_forcing_pt(ckpt, generator=sd, generator_ema={k: v * 0.5 for k, v in sd.items()})
    proc = _infer(tmp_path, "videos", ["--checkpoint", str(ckpt), "--use_ema"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = _check_outputs(tmp_path / "videos", frames_per_video=1 + 4 * 2)
    assert summary["use_ema"] is True


def test_torchrun_generates_every_prompt_exactly_once_and_matches_one_process(tmp_path):
    one = _infer(tmp_path, "one", [])
    two = _infer(tmp_path, "two", [], nproc=2)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-4000:]
    _check_outputs(tmp_path / "one", 9)
    _check_outputs(tmp_path / "two", 9)
    for mp4 in (tmp_path / "one").glob("*.mp4"):  # noise depends on (seed, prompt), not on the rank
        assert (
            iio.imread(mp4).astype(int) - iio.imread(tmp_path / "two" / mp4.name).astype(int)
        ).__abs__().max() <= 2


def test_generation_longer_than_training_with_a_rolling_window(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    base = [
        "inference.py",
        "--config",
        "configs/tiny_dmd.yaml",
        "--data_path",
        str(prompts),
        "--num_output_frames",
        "9",
    ]
    ok = _run(
        [
            *base,
            "--output_folder",
            str(tmp_path / "win"),
            "model_kwargs.local_attn_size=6",
            "image_or_video_shape=[1,3,4,8,8]",
        ]
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert iio.imread(next((tmp_path / "win").glob("*.mp4"))).shape[0] == 1 + 4 * 8


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    logdir = tmp_path_factory.mktemp("run")
    proc = _run(["train.py", "--config", "configs/tiny_dmd.yaml", "--logdir", str(logdir), "max_steps=2", "log_iters=2",
                 "sample_every=0", "ema_start_step=1", "dfake_gen_update_ratio=1"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return logdir


def test_export_writes_upstream_pt_and_safetensors(short_run, tmp_path):
    proc = _run(
        ["scripts/export_checkpoint.py", "--logdir", str(short_run), "--output", str(tmp_path / "exp")]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pt = torch.load(tmp_path / "exp" / "model.pt", weights_only=True)
    assert set(pt) == {"generator", "critic", "generator_ema"}
    assert all(k.startswith("model.") and v.dtype == torch.float32 for k, v in pt["generator"].items())
    for entry, key in (("generator", "generator"), ("ema", "generator_ema")):
        ours = strip_wrapper_prefixes(read_run_model(short_run, entry))
        assert all(
            torch.equal(ours[k], v) for k, v in read_dit_weights(tmp_path / "exp" / "model.pt", key).items()
        )
        folder = tmp_path / "exp" / key
        assert all(torch.equal(ours[k], v) for k, v in read_dit_weights(folder).items())


def test_inference_from_a_run_directory(short_run, tmp_path):
    proc = _infer(tmp_path, "videos", ["--checkpoint", str(short_run), "--use_ema"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check_outputs(tmp_path / "videos", 9)


def test_summary_times_each_stage_and_counts_pixel_frames(tmp_path):
    # Toy weights, 3 latent frames -> 1 + 4 * 2 = 9 pixel frames per video (Wan VAE: 4x in time).
    proc = _infer(tmp_path, "videos", [])
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = _check_outputs(tmp_path / "videos", 9)
    assert summary["warmup_videos"] == 1 and summary["warmup"]["total_s"] > 0
    assert len(summary["videos"]) == len(PROMPTS), "the warm-up video must not be counted"
    assert "pixel frames" in summary["fps_counts"] and summary["dtype"] == "torch.float32"
    for v in summary["videos"]:
        parts = v["text_encode_s"] + v["dit_s"] + v["vae_decode_s"]
        assert 0 < parts <= v["total_s"]
        assert v["dit_s"] == pytest.approx(sum(v["block_dit_s"]))
        assert v["vae_decode_s"] == pytest.approx(sum(v["block_vae_decode_s"]))
        for latency, dit, vae in zip(v["block_latency_s"], v["block_dit_s"], v["block_vae_decode_s"]):
            assert latency == pytest.approx(dit + vae)
        first = v["text_encode_s"] + v["block_dit_s"][0] + v["block_vae_decode_s"][0]
        assert first <= v["time_to_first_frame_s"] <= v["total_s"]
        assert v["fps"] == pytest.approx(v["pixel_frames"] / v["total_s"])
        assert v["pixel_frames"] == 1 + 4 * (v["latent_frames"] - 1)
    videos = summary["videos"]
    assert summary["pixel_frames"] == sum(v["pixel_frames"] for v in videos)
    assert summary["fps"] == pytest.approx(summary["pixel_frames"] / sum(v["total_s"] for v in videos))
    for key in ("text_encode_s", "dit_s", "vae_decode_s", "total_s"):
        assert summary[key] == pytest.approx(sum(v[key] for v in videos)), key


def test_use_ema_before_ema_start_step_is_refused_like_export(tmp_path):
    run = tmp_path / "run"
    proc = _run(["train.py", "--config", "configs/tiny_dmd.yaml", "--logdir", str(run), "max_steps=2",
                 "sample_every=0", "ema_start_step=5"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = _infer(tmp_path, "videos", ["--checkpoint", str(run), "--use_ema"])
    assert proc.returncode == 2, proc.stderr[-4000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "ema_start_step=5" in line and "step 2" in line and "Traceback" not in proc.stderr
    assert not list((tmp_path / "videos").glob("*.mp4"))
    # export agrees: no generator_ema before EMA has started
    proc = _run(["scripts/export_checkpoint.py", "--logdir", str(run), "--output", str(tmp_path / "exp")])
    assert proc.returncode == 0 and "ema_start_step=5" in proc.stderr
    assert "generator_ema" not in torch.load(tmp_path / "exp" / "model.pt", weights_only=True)
