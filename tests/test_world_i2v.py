"""The shapes world's image-to-video stage and the continuation evaluation of its students.

References: the world codec written out here (pixel unshuffle by 4) on clips rendered here; the
training clips' first frames; `inference.py --video` (an independent route: mp4 file in, its own
noise, its own pipeline set-up) judged by `evaluate_continuation`; the Wilson interval formula.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import inference
import train as train_module
from pipeline.self_forcing_training import SelfForcingTrainingPipeline
from tests.test_hardening import _one_process  # noqa: F401  (autouse: train.main in this process)
from utils.config import load_config
from wan import WanModel
from wan.weights import write_self_forcing_pt
from world.chain import LONG_WINDOW
from world.continuation import evaluate_continuation
from world.continuation_eval import SETTINGS, continuation_clips, run_continuation_eval, summarise
from world.data import write_clip_lmdb
from world.network import NETWORK
from world.render import START, Clip, Prompt, render

ROOT = Path(__file__).resolve().parents[1]
I2V = ROOT / "configs" / "world" / "dmd_i2v.yaml"
PROMPTS = [Prompt.parse("a red square moving left fast"), Prompt.parse("a blue circle moving up slow")]
WINDOW = LONG_WINDOW  # the chain's window past the training length


def _first_latent(clip: Clip) -> torch.Tensor:
    """`[48, 4, 4]`: the clip's first frame through the world codec, written out (pixel unshuffle by 4)."""
    return F.pixel_unshuffle(render(clip, 1), 4)[0]


def test_i2v_config_is_the_dmd_config_with_the_image_as_its_own_first_block():
    i2v, t2v = load_config(str(I2V)), load_config(str(ROOT / "configs" / "world" / "dmd.yaml"))
    assert i2v.i2v and i2v.independent_first_frame and i2v.trainer == "dmd"
    assert i2v.num_training_frames == 1 + 4 * i2v.num_frame_per_block == 13
    assert i2v.image_or_video_shape[1] == i2v.num_training_frames
    for key in ("num_frame_per_block", "denoising_step_list", "lr", "lr_critic", "dfake_gen_update_ratio",
                "batch_size", "max_steps", "seed", "guidance_scale", "denoising_loss_type"):  # fmt: skip
        assert getattr(i2v, key) == getattr(t2v, key), key


def test_i2v_world_config_trains_two_steps_from_the_clips_first_frames(tmp_path, monkeypatch):
    write_clip_lmdb(tmp_path / "clips", PROMPTS, 12)
    # the LMDB stores latents in float16 (as `scripts/encode_videos.py` does): compare at that precision
    firsts = [_first_latent(Clip(q, s)).half().float() for q in PROMPTS for s in range(3)]
    seen = []
    rollout = SelfForcingTrainingPipeline.inference_with_trajectory

    def spy(self, noise, cond, exit_steps, initial_latent=None, *args, **kwargs):
        seen.append((noise.shape, initial_latent))
        return rollout(self, noise, cond, exit_steps, initial_latent, *args, **kwargs)

    monkeypatch.setattr(SelfForcingTrainingPipeline, "inference_with_trajectory", spy)
    logdir = tmp_path / "run"
    code = train_module.main(
        ["--config", str(I2V), "--logdir", str(logdir), f"data_path={tmp_path / 'clips'}", "generator_ckpt=null",
         "fake_score_ckpt=null", "max_steps=2", "log_iters=2", "batch_size=2", "dfake_gen_update_ratio=2",
         "sample_every=0", "wandb_mode=disabled"]
    )  # fmt: skip
    assert code == 0
    rows = [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2
    assert all(math.isfinite(v) for r in rows for k, v in r.items() if k.endswith("_loss"))
    assert seen, "no Self-Forcing rollout ran"
    for noise_shape, image in seen:  # the image, then 4 blocks of 3, every row a clip's first frame
        assert tuple(noise_shape[1:]) == (12, 48, 4, 4)
        assert image is not None and image.shape[1:] == (1, 48, 4, 4)
        for row in image[:, 0]:
            assert any(torch.equal(row, f) for f in firsts)


# ---------------------------------------------------------------------------------------------- eval


def _world_run(tmp_path: Path) -> Path:
    """A world T2V student 'run': its config.yaml (4-step schedule shrunk to one step, see below) and
    random non-zero-gated weights as an upstream-format .pt, which inference.py reads too."""
    g = torch.Generator().manual_seed(7)
    sd = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in WanModel(NETWORK).state_dict().items()}  # fmt: skip
    run = tmp_path / "student"
    run.mkdir()
    write_self_forcing_pt(run / "weights.pt", generator=sd)
    # One denoising step: the only noise is the initial one, so both routes can be given the same noise
    # (their between-step noise streams are drawn differently by design).
    text = (ROOT / "configs" / "world" / "dmd.yaml").read_text()
    text = text.replace("denoising_step_list: [1000, 750, 500, 250]", "denoising_step_list: [1000]")
    (run / "config.yaml").write_text(text)
    return run


def _lossless_video(path: Path, video: torch.Tensor) -> None:
    """`[T, 3, 16, 16]` in [-1, 1] (exact multiples of 1/127.5) -> an FFV1 .mkv that decodes bit for bit."""
    frames = ((video + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    writer = imageio_ffmpeg.write_frames(
        str(path), (16, 16), fps=16, codec="ffv1", pix_fmt_out="bgr0", macro_block_size=1
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame).tobytes())
    writer.close()


def test_continuation_eval_equals_inference_py_video_judged_by_evaluate_continuation(tmp_path, monkeypatch):
    """Sample i of the eval starts from the noise seeded by (seed=0, i): 0 for i = 0, 1 for i = 1; so
    does inference.py's sample k of video 0 with --seed 0 (seed 0 * 1000003 + 0 * 1009 + k). The eval
    continues clips [A, B] (one prompt, shades 0 and 1: `continuation_clips`); inference.py continues
    A's and B's mkv files from their first 3 frames in two runs."""
    run = _world_run(tmp_path)
    monkeypatch.setattr("utils.checkpoint.read_run_model", lambda path, entry="generator": _pt_weights(run))
    clips = continuation_clips(PROMPTS[:1], 2)
    assert clips == [Clip(PROMPTS[0], 0), Clip(PROMPTS[0], 1)]
    setting = SETTINGS["first_block_long"]  # 3 given + 36: past the training length, in the window
    results = run_continuation_eval(
        {"student": run}, {"student": ["first_block_long"]}, PROMPTS[:1], eval_samples=1, long_samples=2,
        window=WINDOW, out_dir=tmp_path / "eval", say=lambda _: None,
    )  # fmt: skip

    captured: dict[str, torch.Tensor] = {}
    monkeypatch.setattr(inference, "write_mp4", lambda path, video, fps: captured.__setitem__(Path(path).name, video.clone()))  # fmt: skip
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0].text + "\n")
    videos = []
    for i, clip in enumerate(clips):
        _lossless_video(tmp_path / f"clip{i}.mkv", render(clip, 3))
        captured.clear()
        code = inference.main(
            ["--config", str(run / "config.yaml"), "--checkpoint", str(run / "weights.pt"), "--data_path",
             str(prompts), "--video", str(tmp_path / f"clip{i}.mkv"), "--num_context_frames", "3",
             "--num_output_frames", str(setting.num_frames), "--num_samples", str(i + 1), "--seed", "0",
             "--output_folder", str(tmp_path / f"out{i}"), "--no_warmup", *WINDOW]
        )  # fmt: skip
        assert code == 0
        videos.append(captured[sorted(captured)[i]])  # sample k = i
    # inference.py read the given frames from 8-bit files (the world's greys are not multiples of
    # 1/255): its context is off by up to half a grey level, its generated frames by a few thousandths.
    # Another noise seed moves them by far more, so the tolerance still tells the seeds apart.
    samples = torch.load(tmp_path / "eval" / "continuation_samples.pt")["first_block_long"]
    assert samples["clips"] == [(PROMPTS[0].text, 0, START)]
    mine_video = samples["videos"]["student"][0]
    assert torch.equal(mine_video[:3], render(clips[0], 3))  # given frames back unchanged (lossless codec)
    torch.testing.assert_close(mine_video, videos[0], rtol=0, atol=0.02)
    assert (videos[1][3:] - videos[0][3:]).abs().max() > 0.2
    reference = summarise(evaluate_continuation(torch.stack(videos), clips, 3, 12))
    mine = results["student"]["first_block_long"]
    assert [s["stop"] - s["start"] for s in mine["segments"]] == [12, 12, 12]
    assert mine["summary"]["context_rmse"] == 0.0 and reference["summary"]["context_rmse"] < 0.5 / 127.5
    pairs = zip(
        [mine["summary"], *mine["segments"]], [reference["summary"], *reference["segments"]], strict=True
    )
    for got, want in pairs:
        assert got.keys() == want.keys()
        for key in ("n", "start", "stop", "accuracy", "shade_kept", "accuracy_ci", "shade_kept_ci"):
            assert got[key] == want[key], key
        for key in ("rmse", "worst_frame_rmse"):
            assert got[key] == pytest.approx(want[key], abs=0.01), key


def _pt_weights(run: Path) -> dict[str, torch.Tensor]:
    """The wrapper's keys (`model.<wan key>`), as `read_run_model` returns them."""
    return torch.load(run / "weights.pt", weights_only=True)["generator"]


def test_summary_intervals_are_wilson_intervals_over_samples():
    """Two clips continued: one perfectly, one with the wrong shade from the first generated frame."""
    clips = [Clip(PROMPTS[0], 0), Clip(PROMPTS[1], 2)]
    good = render(clips[0], 15)
    bad = render(clips[1], 15)
    bad[3:] = render(Clip(PROMPTS[1], 0), 15)[3:]
    out = summarise(evaluate_continuation(torch.stack([good, bad]), clips, 3, 12))["summary"]
    assert out["accuracy"] == 0.5 and out["shade_kept"] == 0.5 and out["n"] == 2
    z = 1.959963984540054
    centre, half = (0.5 + z * z / 4) / (1 + z * z / 2), z / (1 + z * z / 2) * math.sqrt(0.25 / 2 + z * z / 16)
    assert out["accuracy_ci"] == pytest.approx((centre - half, centre + half))
    assert out["shade_kept_ci"] == pytest.approx((centre - half, centre + half))


# ---------------------------------------------------------------------------------------------- report


def _continuations(clips: list[Clip], frames: int, wrong_shade: bool = False, freeze_from: int | None = None):
    """Made-up continuations: the truth, or its frames after the first on another shade, or the truth
    frozen from frame `freeze_from` on."""
    out = []
    for c in clips:
        video = render(c, frames)
        if wrong_shade:
            video[1:] = render(Clip(c.prompt, (c.shade + 1) % 3), frames)[1:]
        if freeze_from is not None:
            video[freeze_from:] = video[freeze_from - 1]
        out.append(video)
    return torch.stack(out)


def test_report_section_targets_tables_and_strips(tmp_path):
    """The I2V student continues perfectly, the T2V one on the wrong shade; in the long setting the T2V
    student is right for its first 12 generated frames, then freezes. 12 samples: a perfect rate's
    Wilson interval is [1 / (1 + z^2 / 12), 1] = [0.76, 1.00], a zero rate's [0.00, 0.24]."""
    from world.continuation_report import continuation_section

    clips = continuation_clips(PROMPTS, 6)
    first, long = SETTINGS["first_frame"], SETTINGS["first_block_long"]
    judged = {
        "sf_dmd_i2v": {"first_frame": _continuations(clips, first.num_frames)},
        "sf_dmd": {
            "first_frame": _continuations(clips, first.num_frames, wrong_shade=True),
            "first_block_long": _continuations(clips, long.num_frames, freeze_from=15),
        },
    }
    results = {"settings": {s.name: {"title": s.title, "num_context_frames": s.num_context_frames,
                                     "generated_frames": s.generated_frames} for s in (long, first)}}  # fmt: skip
    samples = {}
    for method, parts in judged.items():
        for name, videos in parts.items():
            k = SETTINGS[name].num_context_frames
            results.setdefault(method, {})[name] = summarise(evaluate_continuation(videos, clips, k, 12))
            part = samples.setdefault(name, {"clips": [(clips[0].prompt.text, 0)], "num_context_frames": k, "videos": {}})  # fmt: skip
            part["videos"][method] = videos[:1]
    (tmp_path / "c.json").write_text(json.dumps(results))
    torch.save(samples, tmp_path / "c.pt")
    (tmp_path / "figures").mkdir()
    labels = {"sf_dmd": "SF-DMD", "sf_dmd_i2v": "SF-DMD I2V"}
    lines = continuation_section(
        tmp_path / "c.json", tmp_path / "c.pt", labels.get, tmp_path, tmp_path / "figures"
    )
    text = "\n".join(lines)
    assert "- shade_kept = 1.00 [0.76, 1.00] (target >= 0.95): met" in text
    assert "- accuracy = 1.00 [0.76, 1.00] (target >= 0.8): met" in text
    assert "- beats SF-DMD given the same frame on shade_kept (0.00 [0.00, 0.24]): met" in text
    # per segment of the long setting: right, then frozen (the objects move)
    rows = [line for line in text.splitlines() if line.startswith("| SF-DMD | ") and line.count("|") == 5]
    assert rows[0] == "| SF-DMD | 1.00 [0.76, 1.00] | 0.00 [0.00, 0.24] | 0.00 [0.00, 0.24] |"  # accuracy
    assert "| frames 3-14 | frames 15-26 | frames 27-38 |" in text
    # strips: the truth, then each method; given frames framed in green
    import imageio.v3 as iio

    strip = iio.imread(tmp_path / "figures" / "continuation_first_frame_0.png")
    assert strip.shape == (3 * (16 * 4 + 4), 13 * (16 * 4 + 4), 3)
    assert tuple(strip[0, 0]) == (40, 200, 40) and tuple(strip[0, 16 * 4 + 4]) == (255, 255, 255)
    assert (tmp_path / "figures" / "continuation_first_block_long_0.mp4").stat().st_size > 0
    assert "(figures/continuation_first_frame_0.png)" in text
