"""Every shipped config loads through the schema, and the real-size ones wire up (on the meta device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.build import NEEDS, build_objective_from_config, make_dit, step_list
from utils.config import config_to_dict, load_config
from wan.gan_head import add_gan_head

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
REAL = [p for p in CONFIGS if not p.name.startswith("tiny_")]


def test_configs_are_shipped():
    names = {p.stem for p in CONFIGS}
    assert {
        "self_forcing_dmd",
        "self_forcing_sid",
        "self_forcing_gan",
        "ode_init",
        "causal_diffusion",
    } <= names
    assert {f"tiny_{t}" for t in ("dmd", "sid", "gan", "ode", "causal_diffusion", "causvid")} <= names
    # image-to-video: one full-size config per objective with an I2V recipe, one tiny one for CI
    assert {
        "self_forcing_dmd_i2v",
        "self_forcing_sid_i2v",
        "self_forcing_gan_i2v",
        "ode_init_i2v",
        "tiny_dmd_i2v",
    } <= names


def test_i2v_configs_are_their_t2v_configs_plus_the_image():
    # Each *_i2v.yaml changes only the I2V keys, the rollout length (the image + the same 7 blocks of 3),
    # the data and the init checkpoint; everything else is the T2V recipe.
    changed = {"i2v", "independent_first_frame", "image_or_video_shape", "num_training_frames", "data_path",
               "generator_ckpt"}  # fmt: skip
    for i2v in (p for p in CONFIGS if p.stem.endswith("_i2v")):
        t2v = config_to_dict(load_config(i2v.with_name(i2v.stem.removesuffix("_i2v") + ".yaml")))
        ours = config_to_dict(load_config(i2v))
        assert {k for k in ours if ours[k] != t2v[k]} <= changed, i2v.stem
        assert ours["i2v"] and ours["independent_first_frame"]
        frames = ours["image_or_video_shape"][1]
        assert frames == ours["num_training_frames"] == 1 + t2v["image_or_video_shape"][1] // 3 * 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads(path):
    cfg = load_config(path)
    assert cfg.trainer in NEEDS


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_real_config_wires_up_on_meta(path):
    cfg = load_config(path)
    needs_real, needs_critic = NEEDS[cfg.trainer]
    with torch.device("meta"):
        gen = make_dit(cfg, "generator")
        real = make_dit(cfg, "real_score") if needs_real else None
        critic = make_dit(cfg, "fake_score") if needs_critic else None
        if cfg.trainer == "gan":
            add_gan_head(critic, num_class=cfg.num_class)
    objective = build_objective_from_config(cfg, gen, real, critic, None, torch.bfloat16)
    assert set(objective.trainable_modules()) == ({"generator", "critic"} if needs_critic else {"generator"})
    n_gen = sum(p.numel() for p in gen.parameters())
    assert abs(n_gen / 1e9 - 1.419) < 0.005  # the 1.3B student everywhere
    if cfg.trainer == "dmd":
        assert abs(sum(p.numel() for p in real.parameters()) / 1e9 - 14.29) < 0.01  # 14B teacher


def test_dmd_step_list_is_upstreams_warped_list():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/self_forcing_dmd.yaml")
    assert step_list(cfg) == pytest.approx([1000, 937.5, 833.3333, 625.0], abs=1e-3)
    ode = load_config(Path(__file__).resolve().parents[1] / "configs/ode_init.yaml")
    assert step_list(ode) == pytest.approx([1000, 960, 888.8889, 727.2727, 0], abs=1e-3)
