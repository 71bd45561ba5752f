"""The shapes-world chain end to end on the smoke profile: every stage runs through the real entry
points (torchrun train.py, generate_ode_pairs.py, export_checkpoint.py), the report is written, and
re-running the command skips the finished stages. Checks the chain and the report, not quality."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from world.chain import CONFIGS, PROFILES, STUDENTS

from .dist_helpers import REPO_ROOT, subprocess_env


@pytest.mark.slow
def test_smoke_chain_runs_every_stage_and_writes_the_report(tmp_path):
    out = tmp_path / "world"
    cmd = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "world_chain.py"),
        "--profile",
        "smoke",
        "--out",
        str(out),
        "--jobs",
        "2",  # the five distillation stages two at a time, as the quick and full profiles run them
    ]
    env = subprocess_env()
    env.pop("OMP_NUM_THREADS", None)  # the chain sets one thread budget per process itself
    first = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    smoke = PROFILES["smoke"]
    assert smoke.i2v
    stages = [
        "data",
        "base",
        "base_eval",
        "ode_pairs",
        "ode",
        "sf_dmd",
        "ode_pairs_i2v",
        "ode_i2v",
        "sf_dmd_i2v",
        *smoke.baselines,
        "eval",
    ]
    for stage in stages:
        assert (out / stage / "DONE.json").is_file(), stage
    for stage in ["base", "ode", "sf_dmd", "ode_i2v", "sf_dmd_i2v", *smoke.baselines]:
        rows = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["step"] > 0 and (out / stage / "export" / "generator").is_dir(), stage
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"data", "base", *STUDENTS}
    base = metrics["base"]
    assert {"heldout", "train", "heldout_ode40", "train_ode40"} <= set(base)
    assert set(base["x0_rmse"]["heldout"]) == {"200", "500", "800"}
    # the data row is the world itself: a perfect score (the evaluator is tested on its own)
    assert metrics["data"]["heldout"]["summary"]["all_attributes"] == 1.0
    assert len(metrics["sf_dmd"]["heldout_long"]["segments"]) == 3
    # continuation: every student from the first block, SF-DMD and the I2V student from the first frame
    cont = json.loads((out / "eval" / "continuation.json").read_text())
    assert set(cont) == {"settings", "data", *STUDENTS, "ode_i2v", "sf_dmd_i2v"}
    assert set(cont["sf_dmd_i2v"]) == set(cont["ode_i2v"]) == {"first_frame"}
    assert set(cont["sf_dmd"]) == {"first_block", "first_block_long", "first_frame"}
    assert set(cont["ode"]) == {"first_block", "first_block_long"}
    assert len(cont["sf_dmd"]["first_block_long"]["segments"]) == 3
    assert cont["data"]["first_block"]["summary"]["accuracy"] == 1.0  # the truth continues itself
    for method in (*STUDENTS, "ode_i2v", "sf_dmd_i2v"):
        for part in cont[method].values():  # the lossless codec gives the given frames back unchanged
            assert part["summary"]["context_rmse"] == 0.0
            assert part["summary"]["n"] in (10 * smoke.eval_samples, 10 * smoke.long_samples)  # 10 held out
    report = (out / "report.md").read_text()
    for needle in (
        "## Base model",
        "## Targets",
        "Self-Forcing DMD",
        "CausVid",
        "figures/losses.png",
        "figures/segments.png",
        "## Continuation (held-out prompts)",
        "### Targets (Self-Forcing DMD, image-to-video, given the first frame, 12 generated frames)",
        "figures/continuation_first_frame_0.png",
        "World: every object starts at the centre;",  # the default world, as the chain names it
    ):
        assert needle in report
    assert (out / "figures" / "0_sf_dmd.mp4").stat().st_size > 0
    assert (out / "figures" / "continuation_first_block_long_0.mp4").stat().st_size > 0
    # a second run skips everything that is done
    again = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped") == len(stages)
    # the distillation sweep runs a DMD variant from this chain and prints its row
    sweep = [sys.executable, "-m", "world.sweep", "--distill", str(out), "--variants", "dmd_critic_from_base",
             "--steps", "2", "--eval_samples", "1", "--results", str(tmp_path / "distill.jsonl")]  # fmt: skip
    done = subprocess.run(sweep, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| dmd_critic_from_base | 2 |" in done.stdout


def test_world_configs_load():
    from model.build import wan_config
    from utils.config import load_config
    from world.network import NETWORK

    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_config(str(path), [])
        changes = dict(cfg.generator_model)  # the component and its WanConfig changes (I2V: extrapolation)
        assert changes.pop("_component_") == "world.network.wan_config", path
        assert wan_config(cfg, "generator") == NETWORK.replace(**changes, **cfg.model_kwargs.wan_config), path


def test_every_profile_override_loads_on_its_stage_config():
    """A profile's per-stage overrides are valid keys and values of that stage's config (a typo would
    otherwise fail only when the stage starts, deep into a full-profile run)."""
    from utils.config import load_config
    from world.chain import CONFIG_OF

    assert PROFILES["full"].overrides, "the full profile's DMD stages carry the critic knobs"
    for profile in PROFILES.values():
        for stage, overrides in profile.overrides.items():
            cfg = load_config(str(CONFIGS / f"{CONFIG_OF[stage]}.yaml"), overrides)
            for override in overrides:
                key, value = override.split("=", 1)
                assert str(getattr(cfg, key)) == str(type(getattr(cfg, key))(value)), (
                    profile.name,
                    stage,
                    key,
                )


def test_a_run_record_from_before_components_still_loads(tmp_path):
    """A world run's config.yaml written when the core had `world` / `world-exact` presets loads as
    the same components (the chain re-evaluates finished runs from their own config.yaml)."""
    from model.build import wan_config
    from world.network import NETWORK
    from world.sampling import load_run_config

    text = (CONFIGS / "dmd.yaml").read_text()
    for key in ("generator_model", "real_score_model", "fake_score_model", "text_encoder", "vae"):
        text = "\n".join(line for line in text.splitlines() if not line.startswith(f"{key}:"))
    old = tmp_path / "config.yaml"
    old.write_text("generator_model: world\nreal_score_model: world-exact\nfake_score_model: world\n" + text)
    cfg = load_run_config(old)
    assert cfg.real_score_model == {"_component_": "world.teacher.ExactTeacher"}
    assert cfg.text_encoder == {"_component_": "world.text.WorldTextEncoder"}
    assert cfg.vae == {"_component_": "world.codec.WorldCodec"}
    assert wan_config(cfg, "generator") == wan_config(cfg, "fake_score") == NETWORK


def test_random_start_overrides_load_on_every_stage_config():
    """--random_start's overrides are keys of every stage's config: the exact teacher of that world and
    networks without frame rows, for every role a stage builds."""
    from model.build import wan_config
    from utils.config import load_config
    from world.chain import CONFIG_OF, RANDOM_START_OVERRIDES

    for stage, config in CONFIG_OF.items():
        cfg = load_config(str(CONFIGS / f"{config}.yaml"), list(RANDOM_START_OVERRIDES))
        assert cfg.real_score_model == {"_component_": "world.teacher.ExactTeacher", "random_start": True}
        for role in ("generator", "fake_score"):
            assert wan_config(cfg, role).pos_embed_frame_rows is False, (stage, role)


def test_random_start_data_and_ode_teacher(tmp_path):
    """The data stage writes every start of every clip (24 rows per prompt, keys naming shade and start;
    the centre-start keys as before) and generate_ode_pairs' `--weights exact-random-start` is that
    world's teacher."""
    from scripts._common import build_teacher
    from utils.lmdb import LMDBWriter, shard_path
    from world.data import write_clip_lmdb
    from world.render import STARTS, all_prompts

    prompts = all_prompts()[:2]
    assert write_clip_lmdb(tmp_path / "clips", prompts, 3, random_start=True) == 2 * 24
    with LMDBWriter(shard_path(tmp_path / "clips", 0), append=True) as rows:
        for p in prompts:
            for shade in range(3):
                assert rows.contains(f"{p.text}#{shade}")  # the centre start keeps the default world's key
                assert all(rows.contains(f"{p.text}#{shade}@{s}") for s in STARTS if s != 7)
    teacher = build_teacher("world", "exact-random-start", 0, torch.device("cpu"), torch.float32)
    assert teacher.random_start and not build_teacher("world", "exact", 0, "cpu", torch.float32).random_start


def test_random_start_profile_wires_every_stage(tmp_path, monkeypatch):
    """A --random_start chain gives every training stage the random-start overrides (after the stage's
    own, before the profile's), its ODE pairs the random-start exact teacher, and its long rollouts the
    window without a sink; the default profile gives none of them (the commands are captured, not run)."""
    import dataclasses

    from world.chain import LONG_WINDOW, RANDOM_START_LONG_WINDOW, RANDOM_START_OVERRIDES, Chain

    for random_start in (False, True):
        profile = dataclasses.replace(PROFILES["full"], random_start=random_start)
        chain = Chain(tmp_path / str(random_start), profile)
        commands: dict[str, list[str]] = {}
        monkeypatch.setattr(
            chain,
            "_subprocess",
            lambda stage, cmd, total_steps=None, jobs=1, seen=commands: seen.setdefault(stage, cmd),
        )  # the first command of a stage: train.py (the export follows)
        chain.train("sf_dmd", "probe", ["data_path=x"], 3)
        chain.ode_pairs()
        args = commands["sf_dmd"]
        extra = list(RANDOM_START_OVERRIDES) if random_start else []
        assert args[args.index("data_path=x") :] == ["data_path=x", *extra, *profile.overrides["sf_dmd"]]
        weights = commands["ode_pairs"][commands["ode_pairs"].index("--weights") + 1]
        assert weights == ("exact-random-start" if random_start else "exact")
        assert chain.window() == (RANDOM_START_LONG_WINDOW if random_start else LONG_WINDOW)


def test_command_line_picks_students_samples_and_distillation_seed(tmp_path, monkeypatch):
    """`scripts/world_chain.py` flags change only what they name: the baselines, the I2V stage, the
    36-frame samples, and `seed=S` appended after the profile's own overrides of every distillation stage
    (never the base or the ODE init, so a copied root's base and init stay valid)."""
    from scripts import world_chain as cli
    from world.chain import Chain

    ran: list = []
    monkeypatch.setattr(Chain, "run", lambda self: ran.append((self.root, self.profile)))

    full = PROFILES["full"]
    assert cli.main(["--profile", "full", "--out", str(tmp_path / "a")]) == 0
    assert ran[-1] == (tmp_path / "a", full)  # no flag: the profile as defined

    argv = ["--profile", "full", "--random_start", "--out", str(tmp_path / "b"), "--no_i2v", "--long_samples",
            "32", "--distill_seed", "4", "--baselines", "dmd_teacher_forcing", "dmd_diffusion_forcing"]  # fmt: skip
    assert cli.main(argv) == 0
    root, got = ran[-1]
    assert root == tmp_path / "b"
    assert got.random_start and not got.i2v and got.long_samples == 32
    assert got.baselines == ("dmd_teacher_forcing", "dmd_diffusion_forcing")
    assert (got.base_steps, got.ode_steps, got.distill_steps, got.eval_samples) == (4000, 1000, 800, 16)
    critic = ["dfake_gen_update_ratio=10", "lr=5e-5"]
    assert got.overrides == {
        "sf_dmd": [*critic, "seed=4"],
        "dmd_teacher_forcing": [*critic, "seed=4"],
        "dmd_diffusion_forcing": [*critic, "seed=4"],
        "sf_dmd_i2v": ["seed=4"],
        "sf_sid": ["seed=4"],
        "sf_gan": ["seed=4"],
    }
    assert full.overrides["sf_dmd"] == critic  # the shared profile is not mutated

    # the seed reaches train.py last, after the stage's and the world's overrides
    chain = Chain(tmp_path / "c", got)
    commands: dict[str, list[str]] = {}
    monkeypatch.setattr(
        chain, "_subprocess", lambda stage, cmd, total_steps=None, jobs=1: commands.setdefault(stage, cmd)
    )
    chain.train("sf_dmd", "probe", ["data_path=x"], 3)
    assert commands["sf_dmd"][-3:] == [*critic, "seed=4"]

    # --network reaches both networks of every training stage, before the seed; other flags untouched
    assert cli.main(["--profile", "full", "--out", str(tmp_path / "d"), "--network", "num_layers=4", "dim=192",
                     "--distill_seed", "5"]) == 0  # fmt: skip
    _, deep = ran[-1]
    net = ["generator_model.num_layers=4", "generator_model.dim=192", "fake_score_model.num_layers=4",
           "fake_score_model.dim=192"]  # fmt: skip
    assert deep.overrides == {
        "base": net,
        "ode": net,
        "ode_i2v": net,  # an init, like the ODE init: the seed leaves it alone
        "sf_dmd": [*critic, *net, "seed=5"],
        "dmd_teacher_forcing": [*critic, *net, "seed=5"],
        "dmd_diffusion_forcing": [*critic, *net, "seed=5"],
        "sf_dmd_i2v": [*net, "seed=5"],
        "sf_sid": [*net, "seed=5"],
        "sf_gan": [*net, "seed=5"],
    }
    assert dataclasses.replace(deep, overrides=full.overrides) == full
    chain = Chain(tmp_path / "e", deep)
    monkeypatch.setattr(
        chain, "_subprocess", lambda stage, cmd, total_steps=None, jobs=1: commands.setdefault(stage, cmd)
    )
    chain.train("base", "probe", ["data_path=x"], 3)
    assert commands["base"][-4:] == net  # after the world's own overrides: the later wins
    for bad in ("num_layer=4", "num_layers", "num_layers="):  # not a WanConfig field / no value
        with pytest.raises(SystemExit):
            cli.main(["--network", bad])

    with pytest.raises(SystemExit):
        cli.main(["--baselines", "sf_dmd"])  # not a baseline
    for flag in ("--long_samples", "--eval_samples"):
        with pytest.raises(SystemExit):
            cli.main([flag, "0"])
    assert cli.main(["--profile", "full", "--out", str(tmp_path / "e"), "--eval_samples", "48"]) == 0
    assert ran[-1][1] == dataclasses.replace(full, eval_samples=48)
    with pytest.raises(SystemExit):
        cli.main(["--jobs", "0"])
    assert cli.main(["--profile", "full", "--out", str(tmp_path / "f"), "--jobs", "3"]) == 0
    assert ran[-1][1] == dataclasses.replace(full, jobs=3)
    assert cli.main(["--profile", "full", "--out", str(tmp_path / "g"), "--base_low_lr_steps", "1000"]) == 0
    assert ran[-1][1] == dataclasses.replace(full, base_low_lr_steps=1000)
    for bad in ("-1", "4000"):  # the full profile's base has 4000 steps
        with pytest.raises(SystemExit):
            cli.main(["--profile", "full", "--base_low_lr_steps", bad])


def test_side_by_side_runs_every_stage_at_once_and_raises_the_first_failure(monkeypatch):
    """Two stages that can only finish together (a two-party barrier) do under jobs=2; a failing stage
    does not stop the others (each keeps its DONE.json), and its error is raised after they end. Each
    stage's processes get the cores divided by stages x processes."""
    import threading

    from world.chain import Chain, _env

    barrier = threading.Barrier(2, timeout=30)
    ran: list[str] = []

    def stage(name: str, fail: bool = False) -> None:
        barrier.wait()  # BrokenBarrierError unless the other stage runs at the same time
        ran.append(name)
        if fail:
            raise RuntimeError(f"stage {name} failed")

    with pytest.raises(RuntimeError, match="stage b failed"):
        Chain.side_by_side([lambda: stage("a"), lambda: stage("b", fail=True), lambda: stage("c"),
                            lambda: stage("d")], jobs=2)  # fmt: skip
    assert sorted(ran) == ["a", "b", "c", "d"]
    ran.clear()
    Chain.side_by_side([lambda: ran.append("x"), lambda: ran.append("y")], jobs=1)
    assert ran == ["x", "y"]

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert [_env(nproc, jobs)["OMP_NUM_THREADS"] for nproc, jobs in [(1, 1), (1, 2), (2, 2), (8, 4)]] == [
        "16", "8", "4", "1",
    ]  # fmt: skip
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting wins
    assert _env(1, 2)["OMP_NUM_THREADS"] == "3"


def test_base_step_down_reaches_the_base_run_as_a_schedule(tmp_path, monkeypatch):
    """Profile.base_low_lr_steps: the base's train.py gets a step schedule whose LR (as the trainer
    builds it from the merged config) is base.yaml's lr for the first steps and its lr_min for the
    last `base_low_lr_steps`; 0 leaves the base's constant LR alone."""
    from recipe.optimizers import lr_scheduler
    from utils.config import load_config
    from world.chain import Chain

    profile = dataclasses.replace(PROFILES["full"], base_steps=10, base_low_lr_steps=3)
    chain = Chain(tmp_path / "a", profile)
    commands: dict[str, list[str]] = {}
    monkeypatch.setattr(
        chain, "_subprocess", lambda stage, cmd, total_steps=None, jobs=1: commands.setdefault(stage, cmd)
    )
    chain.train("base", "probe", ["data_path=x", *chain.base_schedule()], profile.base_steps)
    args = commands["base"]
    cfg = load_config(args[args.index("--config") + 1], args[args.index("--logdir") + 2 :])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = lr_scheduler(cfg, "generator", opt)
    lrs = []
    for _ in range(cfg.max_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    base = load_config(CONFIGS / "base.yaml")
    assert lrs == pytest.approx([base.lr] * 7 + [base.lr_min] * 3, rel=1e-12)
    assert base.lr_min == pytest.approx(base.lr / 10)
    assert Chain(tmp_path / "b", PROFILES["full"]).base_schedule() == []
    with pytest.raises(ValueError, match="base_low_lr_steps=10"):
        Chain(tmp_path / "c", dataclasses.replace(profile, base_low_lr_steps=10)).base_schedule()


@pytest.mark.parametrize("jobs", [1, 2])
def test_run_orders_stages_longest_first_and_pools_the_base_eval(tmp_path, monkeypatch, jobs):
    """Chain.run's order (stages recorded, not run): the distillation stages start longest first by
    SIDE_BY_SIDE_SECONDS; with jobs > 1 the base's evaluation joins them (last: the shortest) on the
    torch threads of one job, which the process gets back afterwards; with jobs = 1 it follows the base."""
    from world.chain import SIDE_BY_SIDE_SECONDS, Chain

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.setattr("world.report.write_report", lambda inputs: None)
    profile = dataclasses.replace(PROFILES["full"], jobs=jobs)
    chain = Chain(tmp_path, profile)
    order: list[str] = []
    pools: list[int] = []
    monkeypatch.setattr(chain, "data", lambda: order.append("data"))
    monkeypatch.setattr(chain, "ode_pairs", lambda stage="ode_pairs", frames=12, jobs=1: order.append(stage))
    monkeypatch.setattr(chain, "train", lambda stage, what, overrides, steps, jobs=1: order.append(stage))
    monkeypatch.setattr(chain, "evaluate_base", lambda: order.append(f"base_eval@{torch.get_num_threads()}"))
    monkeypatch.setattr(chain, "_run_stage", lambda stage, what, fn: order.append(stage))

    def pool(stages, n):
        pools.append(n)
        for stage in stages:
            stage()

    monkeypatch.setattr(Chain, "side_by_side", staticmethod(pool))
    threads = torch.get_num_threads()
    chain.run()
    distill = sorted(["sf_dmd", "sf_dmd_i2v", *profile.baselines], key=lambda s: -SIDE_BY_SIDE_SECONDS[s])
    assert distill[0] == "sf_gan" and distill[-1] == "dmd_diffusion_forcing"
    # the I2V slot: its 13-frame pairs, its ODE init, then the student, one after the other
    slot = distill.index("sf_dmd_i2v")
    distill[slot : slot + 1] = ["ode_pairs_i2v", "ode_i2v", "sf_dmd_i2v"]
    if jobs == 1:
        assert order == ["data", "base", f"base_eval@{threads}", "ode_pairs", "ode", *distill, "eval"]
    else:
        assert order == ["data", "base", "ode_pairs", "ode", *distill, "base_eval@8", "eval"]
    assert pools == [jobs] and torch.get_num_threads() == threads


def test_image_to_video_slot_starts_the_student_from_its_own_ode_init(tmp_path, monkeypatch):
    """The I2V slot (commands recorded, not run): 13-frame exact pairs, then the I2V ODE init regressed on
    them from the T2V ODE init, then the I2V student with generator and critic from the I2V ODE init,
    every step on the slot's share of the cores."""
    from world.chain import Chain

    chain = Chain(tmp_path, PROFILES["full"])
    commands: dict[str, list[str]] = {}
    jobs_of: dict[str, int] = {}

    def record(stage, cmd, total_steps=None, jobs=1):
        commands.setdefault(stage, cmd)
        jobs_of[stage] = jobs

    monkeypatch.setattr(chain, "_subprocess", record)
    chain.image_to_video(jobs=2)
    assert list(commands) == ["ode_pairs_i2v", "ode_i2v", "sf_dmd_i2v"]
    assert set(jobs_of.values()) == {2}
    pairs = commands["ode_pairs_i2v"]
    assert pairs[pairs.index("--latent_frames") + 1] == "13"
    assert pairs[pairs.index("--out") + 1] == str(tmp_path / "ode_pairs_i2v")
    ode = commands["ode_i2v"]
    assert ode[ode.index("--config") + 1].endswith("configs/world/ode_i2v.yaml")
    assert f"data_path={tmp_path / 'ode_pairs_i2v'}" in ode
    assert f"generator_ckpt={tmp_path / 'ode' / 'export' / 'generator'}" in ode
    assert "max_steps=150" in ode  # the full profile's i2v_ode_steps
    student = commands["sf_dmd_i2v"]
    init = tmp_path / "ode_i2v" / "export" / "generator"
    assert f"generator_ckpt={init}" in student and f"fake_score_ckpt={init}" in student
    assert f"data_path={tmp_path / 'data' / 'clips'}" in student
    assert "max_steps=400" in student  # the full profile's i2v_distill_steps
    # a profile without its own I2V critic steps gives the I2V student every student's
    commands.clear()
    other = Chain(tmp_path / "other", dataclasses.replace(PROFILES["full"], i2v_distill_steps=None))
    monkeypatch.setattr(other, "_subprocess", record)
    other.image_to_video(jobs=2)
    assert "max_steps=800" in commands["sf_dmd_i2v"]
    for bad in ({"i2v_distill_steps": 0}, {"i2v_ode_steps": 0}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be >= 1"):
            dataclasses.replace(PROFILES["full"], **bad)
