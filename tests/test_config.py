"""The typed config: typos fail loudly, overrides apply, upstream YAMLs load, saved configs reload."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest

from utils.config import ConfigError, TrainConfig, load_config, resolve_accumulation, save_config

# The keys of upstream's configs/self_forcing_dmd.yaml (spec §10.2), values as shipped except
# paths and credentials (wandb_key/host are rejected here; see test_wandb_credentials_rejected).
UPSTREAM_DMD_YAML = """
generator_ckpt: checkpoints/ode_init.pt
generator_fsdp_wrap_strategy: size
real_score_fsdp_wrap_strategy: size
fake_score_fsdp_wrap_strategy: size
real_name: Wan2.1-T2V-14B
text_encoder_fsdp_wrap_strategy: size
denoising_step_list: [1000, 750, 500, 250]
warp_denoising_step: true
ts_schedule: false
num_train_timestep: 1000
timestep_shift: 5.0
guidance_scale: 3.0
denoising_loss_type: flow
mixed_precision: true
seed: 0
wandb_entity: my-entity
wandb_project: self-forcing
sharding_strategy: hybrid_full
lr: 2.0e-06
lr_critic: 4.0e-07
beta1: 0.0
beta2: 0.999
beta1_critic: 0.0
beta2_critic: 0.999
data_path: prompts/vidprom_filtered_extended.txt
batch_size: 1
ema_weight: 0.99
ema_start_step: 200
total_batch_size: 64
log_iters: 50
negative_prompt: "blurry, static"
dfake_gen_update_ratio: 5
image_or_video_shape: [1, 21, 16, 60, 104]
distribution_loss: dmd
trainer: score_distillation
gradient_checkpointing: true
num_frame_per_block: 3
load_raw_video: false
model_kwargs:
  timestep_shift: 5.0
"""

# Upstream configs/default_config.yaml (spec §10.1).
UPSTREAM_DEFAULT_YAML = """
independent_first_frame: false
warp_denoising_step: false
weight_decay: 0.01
same_step_across_blocks: true
discriminator_lr_multiplier: 1.0
last_step_only: false
i2v: false
num_training_frames: 21
gc_interval: 100
context_noise: 0
causal: true
ckpt_step: 0
prompt_name: MovieGenVideoBench
prompt_path: prompts/MovieGenVideoBench.txt
eval_first_n: 64
num_samples: 1
height: 480
width: 832
num_frames: 81
"""


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_typo_in_yaml_names_key_file_and_suggestion(tmp_path):
    path = _write(tmp_path, "lr: 1.0e-5\nlr_critc: 1.0e-6\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "'lr_critc'" in msg and str(path) in msg and "did you mean 'lr_critic'" in msg


def test_typo_in_nested_override_suggests_dotted_key():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model_kwargs.local_atn_size=6"])
    msg = str(err.value)
    assert "'model_kwargs.local_atn_size'" in msg and "command-line" in msg
    assert "did you mean 'model_kwargs.local_attn_size'" in msg


def test_bad_value_type_names_key():
    with pytest.raises(ConfigError, match="lr"):
        load_config(None, ["lr=fast"])


def test_bad_choice_suggests_valid_value():
    with pytest.raises(ConfigError, match=r"trainer='dmdd'.*did you mean 'dmd'"):
        load_config(None, ["trainer=dmdd"])


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="'lr'"):
        load_config(None, ["lr"])


def test_cli_overrides_apply_over_yaml(tmp_path):
    path = _write(tmp_path, "lr: 1.0e-5\nmodel_kwargs:\n  local_attn_size: 12\n  sink_size: 3\n")
    cfg = load_config(
        path,
        [
            "lr=3e-4",
            "model_kwargs.local_attn_size=6",
            "denoising_step_list=[1000,500]",
            "vae_path=/w/vae.pth",
        ],
    )
    assert cfg.lr == pytest.approx(3e-4)
    assert cfg.model_kwargs.local_attn_size == 6
    assert cfg.model_kwargs.sink_size == 3  # from the YAML, untouched by the override of a sibling key
    assert cfg.denoising_step_list == [1000, 500]
    assert cfg.vae_path == "/w/vae.pth"
    assert isinstance(cfg, TrainConfig)


def test_upstream_dmd_yaml_loads_with_meanings_kept(tmp_path, caplog):
    default = _write(tmp_path, UPSTREAM_DEFAULT_YAML, "default.yaml")
    dmd = _write(tmp_path, UPSTREAM_DMD_YAML, "dmd.yaml")
    cfg = load_config(dmd)
    assert cfg.trainer == "dmd"
    assert cfg.real_score_model == "wan2.1-t2v-14b"
    assert cfg.generator_ckpt == "checkpoints/ode_init.pt"
    assert cfg.warp_denoising_step is True
    assert cfg.sharding_strategy == "hybrid_full"
    assert (cfg.lr, cfg.lr_critic) == (pytest.approx(2e-6), pytest.approx(4e-7))
    assert (cfg.beta1, cfg.beta2, cfg.beta1_critic, cfg.beta2_critic) == (0.0, 0.999, 0.0, 0.999)
    assert cfg.total_batch_size == 64 and cfg.dfake_gen_update_ratio == 5
    assert cfg.image_or_video_shape == [1, 21, 16, 60, 104]
    assert cfg.latent_shape == (21, 16, 60, 104)
    assert (cfg.wandb_entity, cfg.wandb_project) == ("my-entity", "self-forcing")
    assert cfg.negative_prompt == "blurry, static"
    # Keys upstream reads but never uses are dropped, each with a warning naming it.
    with caplog.at_level("WARNING", logger="utils.config"):
        cfg_default = load_config(default)
    assert cfg_default.num_training_frames == 21 and cfg_default.context_noise == 0.0
    for key in ("causal", "ckpt_step", "height", "num_frames"):
        assert any(f"'{key}' ignored" in rec.getMessage() for rec in caplog.records)


def test_upstream_sid_yaml_selects_sid_and_conflicts_fail(tmp_path):
    sid = _write(
        tmp_path, "trainer: score_distillation\ndistribution_loss: sid\nreal_name: Wan2.1-T2V-1.3B\n"
    )
    cfg = load_config(sid)
    assert cfg.trainer == "sid" and cfg.real_score_model == "wan2.1-t2v-1.3b"
    # A later layer can switch the upstream objective.
    assert load_config(sid, ["distribution_loss=causvid"]).trainer == "causvid"
    with pytest.raises(ConfigError, match="distribution_loss='dmd' contradicts trainer='gan'"):
        load_config(None, ["trainer=gan", "distribution_loss=dmd"])
    with pytest.raises(ConfigError, match="real_name"):
        load_config(None, ["real_name=Wan2.1-T2V-7B"])


def test_upstream_model_name_in_model_kwargs_selects_generator_preset():
    cfg = load_config(None, ["model_kwargs.model_name=Wan2.1-T2V-14B", "model_kwargs.local_attn_size=9"])
    assert cfg.generator_model == "wan2.1-t2v-14b" and cfg.model_kwargs.local_attn_size == 9


def test_every_key_of_upstreams_shipped_configs_loads(caplog):
    # The fixture holds every key of upstream's default_config.yaml and self_forcing_{dmd,sid}.yaml
    # (spec §10.1-§10.2), credentials included: the file loads as is, the keys keep their meaning.
    fixture = Path(__file__).parent / "fixtures" / "upstream_all_keys.yaml"
    with caplog.at_level("WARNING", logger="utils.config"):
        cfg = load_config(fixture)
    assert cfg.trainer == "dmd" and cfg.real_score_model == "wan2.1-t2v-14b"
    assert (cfg.wandb_entity, cfg.wandb_project) == ("WANDB_ENTITY", "WANDB_PROJECT")
    assert cfg.sid_alpha == 1.0 and cfg.total_batch_size == 64
    credential_warnings = [r.getMessage() for r in caplog.records if "credentials" in r.getMessage()]
    assert len(credential_warnings) == 1, credential_warnings
    assert "wandb_host" in credential_warnings[0] and "wandb_key" in credential_warnings[0]
    assert "environment" in credential_warnings[0]
    assert "WANDB_KEY" not in str(dataclasses.asdict(cfg)), "a credential reached the config"


def test_wandb_credentials_accepted_and_ignored(tmp_path):
    path = _write(tmp_path, "wandb_key: abc123\nwandb_project: p\n")
    cfg = load_config(path, ["wandb_host=https://example.org"])
    assert cfg.wandb_project == "p"
    assert not any(f.name in ("wandb_key", "wandb_host") for f in dataclasses.fields(cfg))


@pytest.mark.parametrize(
    "override, key",
    [
        ("guidance_scale=nan", "guidance_scale"),
        ("lr=inf", "lr"),
        ("lr_critic=-inf", "lr_critic"),
        ("model_kwargs.timestep_shift=nan", "model_kwargs.timestep_shift"),
        ("real_guidance_scale=.nan", "real_guidance_scale"),
    ],
)
def test_non_finite_numbers_are_rejected(override, key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be a finite number"):
        load_config(None, [override])


def test_fixed_upstream_keys_and_aliases():
    with pytest.raises(ConfigError, match="load_raw_video"):
        load_config(None, ["load_raw_video=true"])
    assert load_config(None, ["activation_checkpointing=false"]).gradient_checkpointing is False
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        load_config(None, ["activation_checkpointing=false", "gradient_checkpointing=true"])


def test_defaults_follow_upstream_defaults():
    # Values from upstream default_config.yaml and its getattr fallbacks (spec §10.1, §10.3).
    cfg = load_config()
    expected = {
        "independent_first_frame": False,
        "warp_denoising_step": False,
        "weight_decay": 0.01,
        "same_step_across_blocks": True,
        "discriminator_lr_multiplier": 1.0,
        "last_step_only": False,
        "i2v": False,
        "num_training_frames": 21,
        "gc_interval": 100,
        "context_noise": 0.0,
        "fake_guidance_scale": 0.0,
        "min_score_timestep": 0,
        "ts_schedule_max": False,
        "max_grad_norm_generator": 10.0,
        "max_grad_norm_critic": 10.0,
        "text_encoder_cpu_offload": False,
        "fake_score_model": "wan2.1-t2v-1.3b",
        "gan_g_weight": 1e-2,
        "gan_d_weight": 1e-2,
        "r1_weight": 0.0,
        "r2_weight": 0.0,
        "r1_sigma": 0.01,
        "r2_sigma": 0.01,
        "sid_alpha": 1.0,
        "wandb_mode": "offline",
    }
    actual = {key: getattr(cfg, key) for key in expected}
    assert actual == expected
    assert cfg.model_kwargs.local_attn_size == -1 and cfg.model_kwargs.sink_size == 0


def test_saved_config_reloads_equal(tmp_path):
    cfg = load_config(
        None,
        [
            "trainer=sid",
            "lr=1.5e-5",
            "model_kwargs.sink_size=2",
            "model_kwargs.local_attn_size=8",
            "denoising_step_list=[1000,600,0]",
            "real_score_ckpt=/weights/teacher",
            "total_batch_size=8",
        ],
    )
    path = save_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    assert load_config(path) == cfg


def test_resolve_accumulation_derives_and_checks():
    cfg = load_config(None, ["batch_size=2", "total_batch_size=16"])
    assert resolve_accumulation(cfg, world_size=4) == 16 // (2 * 4)
    assert cfg.gradient_accumulation_steps == 2

    cfg = load_config(None, ["batch_size=1", "gradient_accumulation_steps=3"])
    assert resolve_accumulation(cfg, world_size=2) == 3 and cfg.total_batch_size == 1 * 2 * 3

    assert resolve_accumulation(load_config(), world_size=8) == 1

    with pytest.raises(ConfigError, match=r"total_batch_size=12 .*batch_size x world_size = 1 x 8"):
        resolve_accumulation(load_config(None, ["total_batch_size=12"]), world_size=8)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=3 disagrees"):
        resolve_accumulation(
            load_config(None, ["total_batch_size=16", "gradient_accumulation_steps=3"]), world_size=8
        )


def test_range_checks_name_the_key():
    with pytest.raises(ConfigError, match="ema_weight"):
        load_config(None, ["ema_weight=1.5"])
    with pytest.raises(ConfigError, match="denoising_step_list"):
        load_config(None, ["denoising_step_list=[250,500]"])
    with pytest.raises(ConfigError, match="image_or_video_shape"):
        load_config(None, ["image_or_video_shape=[21,16,60,104]"])
    with pytest.raises(ConfigError, match="local_attn_size"):
        load_config(None, ["model_kwargs.local_attn_size=2", "model_kwargs.sink_size=2"])


def test_i2v_needs_an_i2v_objective_and_the_image_in_a_block_of_its_own():
    for trainer in ("dmd", "sid", "gan", "ode"):
        assert load_config(None, [f"trainer={trainer}", "i2v=true", "independent_first_frame=true"]).i2v
    with pytest.raises(ConfigError, match=r"i2v=true needs independent_first_frame=true"):
        load_config(None, ["i2v=true"])
    for trainer in ("diffusion", "causvid", "teacher_regression"):
        with pytest.raises(ConfigError, match=rf"i2v=true applies to trainer in .* not trainer='{trainer}'"):
            load_config(None, [f"trainer={trainer}", "i2v=true", "independent_first_frame=true"])


def test_model_presets_agree_with_wan_presets():
    # utils may not import wan, so the preset names are listed twice; they must stay in sync.
    from utils.config import MODEL_PRESETS
    from wan import PRESETS

    assert set(MODEL_PRESETS) == set(PRESETS)  # any other network is a component


def test_model_kwargs_wan_config_changes_the_generator_only():
    from model.build import wan_config
    from wan import WanConfig

    cfg = load_config(
        None, ["generator_model=tiny", "fake_score_model=tiny", "model_kwargs.wan_config.num_layers=1"]
    )
    assert wan_config(cfg, "generator") == WanConfig.preset("tiny").replace(num_layers=1)
    assert wan_config(cfg, "fake_score") == WanConfig.preset("tiny")
    typo = load_config(None, ["generator_model=tiny", "model_kwargs.wan_config.num_layer=1"])
    with pytest.raises(ConfigError, match=r"model_kwargs.wan_config: \['num_layer'\]"):
        wan_config(typo, "generator")
    bad = load_config(None, ["generator_model=tiny", "model_kwargs.wan_config.num_heads=5"])
    with pytest.raises(ConfigError, match="num_heads"):
        wan_config(bad, "generator")
