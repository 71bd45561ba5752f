"""Rank-0 logging: JSON-lines metrics, sample videos, the rank filter and the wandb mirror."""

from __future__ import annotations

import json
import logging
import sys
import types

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

from utils.logging import MetricsLogger, WandbSettings, setup_logging


def synthetic_video(frames: int, height: int, width: int) -> torch.Tensor:
    """Smooth moving gradient in [-1, 1], `[T, 3, H, W]` (smooth so lossy video keeps it close)."""
    t = torch.arange(frames, dtype=torch.float32)[:, None, None, None]
    y = torch.linspace(-1, 1, height)[None, None, :, None]
    x = torch.linspace(-1, 1, width)[None, None, None, :]
    c = torch.tensor([1.0, 0.5, -0.5])[None, :, None, None]
    return torch.tanh(c * (x + y) + 0.1 * t).expand(frames, 3, height, width).contiguous()


def as_uint8(video: torch.Tensor) -> np.ndarray:
    """The rule written out: [-1, 1] -> [0, 255] rounded, channels last."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_metrics_jsonl_holds_what_was_logged(tmp_path):
    log = MetricsLogger(tmp_path, rank=0)
    log.log(1, {"generator_loss": 0.5, "critic_grad_norm": torch.tensor(2.25), "tokens": 7})
    log.log(2, {"generator_loss": float("nan"), "lr": np.float32(0.125)})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["generator_loss"] == 0.5 and records[0]["critic_grad_norm"] == 2.25
    assert records[0]["tokens"] == 7 and isinstance(records[0]["time"], float)
    assert records[1]["generator_loss"] == "nan" and records[1]["lr"] == 0.125
    # Appends on resume instead of truncating.
    again = MetricsLogger(tmp_path, rank=0)
    again.log(3, {"x": 1.0})
    again.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    with pytest.raises(ValueError, match="one value"):
        MetricsLogger(tmp_path, rank=0).log(4, {"bad": torch.zeros(2)})


def test_non_zero_rank_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    log = MetricsLogger(run_dir, rank=1, wandb_cfg=WandbSettings(mode="offline"))
    log.log(1, {"loss": 1.0})
    assert log.log_video(1, "sample", synthetic_video(3, 8, 8), fps=8) is None
    log.close()
    assert not run_dir.exists()


@pytest.mark.parametrize("height, width", [(16, 24), (17, 21)])
def test_video_written_and_readable(tmp_path, height, width):
    video = synthetic_video(5, height, width)
    log = MetricsLogger(tmp_path, rank=0)
    mp4 = log.log_video(12, "prompt: a cat/dog", video, fps=8)
    log.close()
    assert mp4 == tmp_path / "samples" / "prompt_a_cat_dog_step00000012.mp4"
    frames = imageio.mimread(mp4)
    assert len(frames) == 5
    even_h, even_w = height + height % 2, width + width % 2
    assert frames[0].shape == (even_h, even_w, 3)
    expected = as_uint8(video)
    decoded = np.stack(frames)[:, :height, :width].astype(np.float32)
    assert np.abs(decoded - expected).mean() < 6.0  # H.264 is lossy; a wrong mapping is off by ~100

    strip = imageio.imread(mp4.with_suffix(".png"))
    # Fewer frames than the strip holds: every frame, side by side, exact (PNG is lossless).
    assert strip.shape == (even_h, 5 * even_w, 3)
    for i in range(5):
        np.testing.assert_array_equal(strip[:height, i * even_w : i * even_w + width], expected[i])


def test_video_shape_is_checked(tmp_path):
    with pytest.raises(ValueError, match=r"\[T, 3, H, W\]"):
        MetricsLogger(tmp_path, rank=0).log_video(0, "v", torch.zeros(2, 8, 8, 3))


class FakeRun:
    def __init__(self, **kwargs):
        self.init_kwargs = kwargs
        self.logged = []
        self.finished = False

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


def test_wandb_mirror_uses_config_mode(tmp_path, monkeypatch):
    runs = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: runs.append(FakeRun(**kwargs)) or runs[-1]
    fake.Video = lambda path, format: ("video", path, format)
    monkeypatch.setitem(sys.modules, "wandb", fake)

    settings = WandbSettings(project="sf", entity="me", name="run1", config={"lr": 1.0})
    log = MetricsLogger(tmp_path, rank=0, wandb_cfg=settings)
    log.log(3, {"loss": 0.25})
    mp4 = log.log_video(3, "sample", synthetic_video(2, 8, 8), fps=4)
    log.close()
    (run,) = runs
    assert run.init_kwargs["mode"] == "offline"  # the default
    assert (run.init_kwargs["project"], run.init_kwargs["entity"], run.init_kwargs["name"]) == (
        "sf",
        "me",
        "run1",
    )
    assert run.init_kwargs["config"] == {"lr": 1.0} and run.init_kwargs["dir"] == str(tmp_path)
    assert run.logged[0] == (3, {"loss": 0.25})
    assert run.logged[1] == (3, {"sample": ("video", str(mp4), "mp4")})
    assert run.finished

    def refuse(**kwargs):
        raise AssertionError("wandb.init called although disabled")

    fake.init = refuse
    MetricsLogger(tmp_path / "off", rank=0, wandb_cfg=WandbSettings(mode="disabled")).close()


@pytest.fixture
def restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_setup_logging_filters_non_zero_ranks(capsys, restore_root_logger):
    log = logging.getLogger("tests.rank_filter")
    setup_logging(rank=1)
    setup_logging(rank=1)  # idempotent: one handler, not two
    log.info("info from rank one")
    log.warning("warning from rank one")
    err = capsys.readouterr().err
    assert "info from rank one" not in err
    assert err.count("warning from rank one") == 1 and "rank1" in err

    setup_logging(rank=0)
    log.info("info from rank zero")
    assert "info from rank zero" in capsys.readouterr().err
