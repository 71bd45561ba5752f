"""world/sweep.py: a probe trains through the real objective and is judged like the chain's base."""

import json
import math

from world import sweep


def test_lr_factor_is_warmup_then_cosine():
    assert sweep.lr_factor(0, 100, 10, "constant") == 0.1
    assert sweep.lr_factor(50, 100, 0, "constant") == 1.0
    for step in (0, 25, 50, 99):
        assert math.isclose(
            sweep.lr_factor(step, 100, 0, "cosine"), 0.5 * (1 + math.cos(math.pi * step / 100))
        )


def test_sweep_runs_a_variant_and_prints_its_row(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    assert sweep.main(["--variants", "nope"]) == 2
    code = sweep.main(["--variants", "sincos_text_x0head_x0loss", "--steps", "2", "--eval_samples", "1",
                       "--results", str(results)])  # fmt: skip
    assert code == 0
    (row,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert row["name"] == "sincos_text_x0head_x0loss" and row["steps"] == 2
    assert row["net"]["predict_x0"] and row["train"]["loss"] == "x0"
    for key in ("heldout_4step", "heldout_ode40", "train_4step", "train_ode40"):
        assert 0.0 <= row[key]["all_attributes"] <= 1.0
    assert set(row["x0_rmse"]) == {"200", "500", "800"} and all(v > 0 for v in row["x0_rmse"].values())
    out = capsys.readouterr().out
    assert "| sincos_text_x0head_x0loss |" in out


def test_every_distill_variant_is_a_valid_config(tmp_path):
    """Each `--distill` variant's overrides load on configs/world/dmd.yaml: a misspelt key or a value
    of the wrong type fails here instead of minutes into a sweep."""
    from pathlib import Path

    from utils.config import load_config

    config = Path(sweep.__file__).resolve().parents[1] / "configs" / "world" / "dmd.yaml"
    for name, overrides in sweep.DISTILL_VARIANTS.items():
        cfg = load_config(config, sweep.distill_overrides(name, tmp_path))
        expected = "sid" if name.startswith("sid_") else "causvid" if name[:3] in ("tf_", "df_") else "dmd"
        assert cfg.trainer == expected, name
        # the pin holds unless the variant itself exits last (configs/world/dmd.yaml now does)
        assert cfg.last_step_only == ("last_step_only=true" in overrides), name
        if "ema_weight=0.95" in overrides:
            assert cfg.ema_weight == 0.95 and cfg.ema_start_step == 200
    # the baselines' variants are the chain's baseline configs with the same critic knobs
    for name, stage in (
        ("tf_ratio10_lr5e-5", "dmd_teacher_forcing"),
        ("df_ratio10_lr5e-5", "dmd_diffusion_forcing"),
    ):
        ours = load_config(config, sweep.distill_overrides(name, tmp_path))
        theirs = load_config(
            config.with_name(f"{stage}.yaml"),
            [*sweep.DMD_CRITIC_KEEPS_UP, f"data_path={tmp_path}/data/clips"],
        )
        assert ours == theirs, name
    cfg = load_config(config, sweep.distill_overrides("sid_alpha1.2", tmp_path))
    assert cfg.sid_alpha == 1.2
    real = sweep.distill_overrides("dmd_real_score_is_base", tmp_path)
    assert load_config(config, real).real_score_model["_component_"] == "world.network.wan_config"


def test_distill_variants_train_in_the_chains_world(tmp_path):
    """`--distill ROOT` trains in the world of ROOT's ODE init: a random-start chain with a deeper network
    gives every variant its teacher's and networks' settings (a variant replacing the real score by the
    base network gets the generator's shape), and the evaluation is told random starts; a centre-start
    chain with the shipped network changes nothing."""
    from pathlib import Path

    import yaml

    from utils.config import load_config

    config = Path(sweep.__file__).resolve().parents[1] / "configs" / "world" / "dmd.yaml"
    net = {"_component_": "world.network.wan_config", "pos_embed_frame_rows": False, "num_layers": 4}
    teacher = {"_component_": "world.teacher.ExactTeacher", "random_start": True}
    for root, saved in (
        (tmp_path / "rs", {"trainer": "ode", "generator_model": net, "real_score_model": teacher,
                           "fake_score_model": net}),
        (tmp_path / "centre", {"trainer": "ode", "generator_model": {"_component_": net["_component_"]}}),
    ):  # fmt: skip
        (root / "ode").mkdir(parents=True)
        (root / "ode" / "config.yaml").write_text(yaml.safe_dump(saved))

    def built(root, name):
        cmd, overrides, random_start = sweep.distill_command(name, root, root / "run", 5)
        assert cmd[cmd.index("--config") + 1] == str(config) and set(overrides) <= set(cmd)
        return load_config(config, cmd[cmd.index("--logdir") + 2 :]), random_start

    cfg, random_start = built(tmp_path / "rs", "dmd_ratio10")
    assert random_start and cfg.max_steps == 5 and cfg.dfake_gen_update_ratio == 10
    assert cfg.generator_model == net and cfg.fake_score_model == net and cfg.real_score_model == teacher
    cfg, _ = built(tmp_path / "rs", "dmd_real_score_is_base")
    assert cfg.real_score_model == net and cfg.real_score_ckpt == f"{tmp_path / 'rs'}/base/export/generator"

    cfg, random_start = built(tmp_path / "centre", "dmd_ratio10")
    shipped = load_config(config)
    assert not random_start
    for role in sweep.WORLD_ROLES:
        assert getattr(cfg, role) == getattr(shipped, role), role
