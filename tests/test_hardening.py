"""The trainer under the failures an outside review found (issue 8): resume of `seed: 0` and GAN runs,
checkpoints that never change the run, restarts with another config, bad data, divergence.

Most runs here go through `train.main` in this process (tiny configs, one rank), which keeps each
run to a few seconds; what needs a separate process (exit codes under torchrun, a SIGBUS) runs one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import train as train_module
from tests.dist_helpers import subprocess_env
from tests.test_train import ROOT, _cmd, load_checkpoint, metrics, weights
from utils.checkpoint import Checkpointer
from utils.config import load_config
from utils.errors import USER_ERROR_EXIT_CODE

from .lmdb_helpers import write_toy_ode_lmdb

QUIET = ["sample_every=0", "wandb_mode=disabled"]


@pytest.fixture(scope="module")
def toy_lmdb(tmp_path_factory) -> Path:
    """ODE-trajectory rows [K+1=5, F=6, C=4, 8, 8]: ODE data, and clean latents via row[-1]."""
    path = tmp_path_factory.mktemp("data") / "toy_ode"
    return write_toy_ode_lmdb(path)


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    """A run in this process: no torchrun variables; the trainer's signal handlers undone after."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def run(config: str, logdir: Path, overrides: list[str], *flags: str) -> int:
    """`train.py --config configs/<config>.yaml --logdir <logdir> <flags> <overrides>` in this process."""
    argv = ["--config", str(ROOT / f"configs/{config}.yaml"), "--logdir", str(logdir), *flags]
    return train_module.main([*argv, *QUIET, *overrides])


def data_for(config: str, lmdb: Path) -> list[str]:
    return [] if config in ("tiny_dmd", "tiny_sid") else [f"data_path={lmdb}"]


# ------------------------------------------------------------------------------------------------
# 1. seed: 0
# ------------------------------------------------------------------------------------------------
def test_seed_zero_run_resumes_bitwise_with_its_drawn_seed(tmp_path):
    common = ["seed=0", "dfake_gen_update_ratio=2", "ema_start_step=1"]
    assert run("tiny_dmd", tmp_path / "resumed", [*common, "max_steps=2", "log_iters=2"]) == 0
    seed = load_config(tmp_path / "resumed" / "config.yaml").seed
    assert seed != 0, "config.yaml must hold the seed the run drew"
    assert run("tiny_dmd", tmp_path / "resumed", [*common, "max_steps=4", "log_iters=2"]) == 0
    assert load_config(tmp_path / "resumed" / "config.yaml").seed == seed
    # The same run uninterrupted, with the drawn seed given explicitly.
    straight = [f"seed={seed}", "dfake_gen_update_ratio=2", "ema_start_step=1", "max_steps=4"]
    assert run("tiny_dmd", tmp_path / "straight", [*straight, "log_iters=100"]) == 0
    a, b = (
        weights(load_checkpoint(tmp_path / "straight", 4)),
        weights(load_checkpoint(tmp_path / "resumed", 4)),
    )
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------
# 2/3. optimizers that have not stepped: saving never changes a run, loading works
# ------------------------------------------------------------------------------------------------
CONFIGS = ["tiny_dmd", "tiny_sid", "tiny_gan", "tiny_ode", "tiny_causal_diffusion", "tiny_causvid"]
# The GAN run's discriminator warm-up (4 steps) spans the save at step 3: the main critic optimizer
# has not stepped when it is saved; the DiT head of the critic never gets a gradient at all.
GAN_WARMUP = ["discriminator_warmup_steps=4", "dfake_gen_update_ratio=1"]


@pytest.mark.parametrize("config", CONFIGS)
def test_final_weights_do_not_depend_on_log_iters(config, tmp_path, toy_lmdb):
    common = [*data_for(config, toy_lmdb), "max_steps=6", "ema_start_step=1"]
    if config == "tiny_gan":
        common += GAN_WARMUP
    for log_iters in (3, 12):
        assert run(config, tmp_path / str(log_iters), [*common, f"log_iters={log_iters}"]) == 0
    a, b = weights(load_checkpoint(tmp_path / "3", 6)), weights(load_checkpoint(tmp_path / "12", 6))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigterm_during_gan_warmup_then_resume_equals_uninterrupted(tmp_path, toy_lmdb, monkeypatch):
    common = [f"data_path={toy_lmdb}", *GAN_WARMUP, "ema_start_step=1", "log_iters=100"]
    assert run("tiny_gan", tmp_path / "straight", [*common, "max_steps=6"]) == 0

    # SIGTERM arrives during step 2 (of the 4 warm-up steps): the step finishes, is saved, the run stops.
    real_step = train_module.Trainer._optimizer_step

    def step_then_signal(self, role):
        out = real_step(self, role)
        if self.state.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(train_module.Trainer, "_optimizer_step", step_then_signal)
    assert run("tiny_gan", tmp_path / "stopped", [*common, "max_steps=6"]) == 0
    monkeypatch.undo()
    assert [s for s, _ in Checkpointer(tmp_path / "stopped").complete_checkpoints()] == [2]
    assert run("tiny_gan", tmp_path / "stopped", [*common, "max_steps=6"]) == 0
    a, b = (
        weights(load_checkpoint(tmp_path / "straight", 6)),
        weights(load_checkpoint(tmp_path / "stopped", 6)),
    )
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------
# 4/5. the run's record: config.yaml and metrics.jsonl
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config, overrides, culprit",
    [
        ("tiny_dmd", ["data_path={tmp}/missing.txt"], "missing.txt"),  # data
        ("tiny_dmd", ["generator_ckpt={tmp}/ode_init.pt"], "ode_init.pt"),  # weights (read by rank 0)
        ("tiny_ode", ["denoising_step_list=[1000,500]"], "denoising_step_list"),  # objective settings
        ("tiny_dmd", ["lr=nan"], "lr"),  # config
    ],
    ids=["data", "weights", "objective", "config"],
)
def test_a_failed_start_prints_one_line_exits_2_and_writes_no_config(
    tmp_path, capsys, config, overrides, culprit
):
    rc = run(config, tmp_path / "run", [o.format(tmp=tmp_path) for o in overrides])
    err = capsys.readouterr().err
    assert rc == USER_ERROR_EXIT_CODE
    assert not (tmp_path / "run" / "config.yaml").exists()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and culprit in lines[0] and "Traceback" not in err, err[-2000:]


def test_restart_with_run_defining_keys_changed_is_one_error_naming_each(tmp_path, capsys):
    logdir = tmp_path / "run"
    assert run("tiny_dmd", logdir, ["max_steps=2", "log_iters=2"]) == 0
    record = (logdir / "config.yaml").read_bytes()
    capsys.readouterr()
    rc = run("tiny_dmd", logdir, ["max_steps=4", "trainer=sid", "denoising_step_list=[1000,500]"])
    err = capsys.readouterr().err
    assert rc == USER_ERROR_EXIT_CODE
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert "trainer: 'dmd' -> 'sid'" in line and "denoising_step_list" in line
    assert "max_steps" not in line and "--allow_config_change" in line
    assert (logdir / "config.yaml").read_bytes() == record, "a failed start rewrote config.yaml"
    assert [s for s, _ in Checkpointer(logdir).complete_checkpoints()] == [2]
    # A failure after the comparison (bad data) leaves the record alone too.
    bad = ["max_steps=4", f"data_path={tmp_path / 'nope.txt'}"]
    assert run("tiny_dmd", logdir, bad, "--allow_config_change") == USER_ERROR_EXIT_CODE
    assert (logdir / "config.yaml").read_bytes() == record
    # With the explicit override the run continues, and the record now says sid.
    assert run("tiny_dmd", logdir, ["max_steps=3", "trainer=sid"], "--allow_config_change") == 0
    assert load_config(logdir / "config.yaml").trainer == "sid"
    assert load_checkpoint(logdir, 3)["trainer"]["step"] == 3


def test_changed_learning_rates_take_effect_on_resume_and_metrics_hold_each_step_once(tmp_path, toy_lmdb):
    logdir = tmp_path / "run"
    common = [f"data_path={toy_lmdb}", *GAN_WARMUP[:1], "discriminator_lr_multiplier=3"]
    assert run("tiny_gan", logdir, [*common, "max_steps=3", "log_iters=2", "lr=2e-4", "lr_critic=4e-5"]) == 0
    # Pretend the run died after logging step 3 but before saving it: step 3 is redone.
    (logdir / "checkpoints" / "step_00000003" / "COMPLETE").unlink()
    assert run("tiny_gan", logdir, [*common, "max_steps=5", "log_iters=2", "lr=1e-4", "lr_critic=1e-5"]) == 0
    ckpt = load_checkpoint(logdir, 5)
    exact = pytest.approx  # new/old rescaling: equal up to rounding
    assert [g["lr"] for g in ckpt["generator"]["optim"]["param_groups"]] == exact([1e-4], rel=1e-12)
    critic = sorted(g["lr"] for g in ckpt["critic"]["optim"]["param_groups"])
    assert critic == exact([1e-5, 3e-5], rel=1e-12)
    assert [g["lr"] for g in ckpt["critic_warmup_optim"]["param_groups"]] == exact([3e-5], rel=1e-12)
    assert [r["step"] for r in metrics(logdir)] == [1, 2, 3, 4, 5]
    assert load_config(logdir / "config.yaml").lr == 1e-4


def test_resume_that_changes_the_lr_decay_horizon_is_refused_or_follows_the_new_config(
    tmp_path, toy_lmdb, capsys
):
    """cosine over max_steps: 3 steps, then a resume to 6. Silently keeping the restored 3-step horizon
    (LR lr_min from step 4 on) while the log said max_steps changed was the defect. Now: one error
    naming the horizon; lr_decay_steps=3 continues bitwise as a run that had it from the start; the
    override continues over the new horizon from the restored step (the formula written out)."""
    common = [f"data_path={toy_lmdb}", "lr_schedule=cosine", "lr_min=2e-5", "log_iters=3"]
    assert run("tiny_ode", tmp_path / "split", [*common, "max_steps=3"]) == 0
    shutil.copytree(tmp_path / "split", tmp_path / "override")
    capsys.readouterr()
    assert run("tiny_ode", tmp_path / "split", [*common, "max_steps=6"]) == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert "LR decay horizon" in line and "3 -> 6" in line and "lr_decay_steps=3" in line, line
    assert [s for s, _ in Checkpointer(tmp_path / "split").complete_checkpoints()] == [3]

    keep = [*common, "max_steps=6", "lr_decay_steps=3"]
    assert run("tiny_ode", tmp_path / "split", keep) == 0
    assert run("tiny_ode", tmp_path / "once", keep) == 0
    a, b = weights(load_checkpoint(tmp_path / "once", 6)), weights(load_checkpoint(tmp_path / "split", 6))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    assert run("tiny_ode", tmp_path / "override", [*common, "max_steps=6"], "--allow_config_change") == 0
    # LR of optimizer step k: 2e-5 + (2e-4 - 2e-5) (1 + cos(pi k / horizon)) / 2, horizon 3 then 6.
    cosine = [
        0.5 * (1 + math.cos(math.pi * k / n)) for k, n in [(0, 3), (1, 3), (2, 3), (3, 6), (4, 6), (5, 6)]
    ]
    lrs = [r["generator_lr"] for r in metrics(tmp_path / "override")]
    assert lrs == pytest.approx([2e-5 + 1.8e-4 * f for f in cosine], rel=1e-12)


def test_lr_step_down_follows_its_formula_and_a_resume_across_the_drop_is_bitwise(tmp_path, toy_lmdb, capsys):
    """lr_schedule=step: the peak LR until optimizer step lr_decay_start, lr_min from it on. A run
    stopped before the drop and resumed to a longer max_steps (no decay horizon to move) equals the
    run that went straight through, bit for bit, and logs the written-out LR of every step."""
    common = [f"data_path={toy_lmdb}", "lr_schedule=step", "lr_decay_start=3", "lr_min=2e-5", "log_iters=2"]
    assert run("tiny_ode", tmp_path / "split", [*common, "max_steps=2"]) == 0
    assert run("tiny_ode", tmp_path / "split", [*common, "max_steps=5"]) == 0
    assert run("tiny_ode", tmp_path / "once", [*common, "max_steps=5"]) == 0
    a, b = weights(load_checkpoint(tmp_path / "once", 5)), weights(load_checkpoint(tmp_path / "split", 5))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # optimizer steps 0, 1, 2 before the drop, 3 and 4 after it
    expected = [2e-4, 2e-4, 2e-4, 2e-5, 2e-5]
    for logdir in ("split", "once"):
        assert [r["generator_lr"] for r in metrics(tmp_path / logdir)] == pytest.approx(expected, rel=1e-12)
    # where the drop starts defines the run: moving it on resume is refused, naming the key
    capsys.readouterr()
    moved = [*common[:2], "lr_decay_start=4", *common[3:], "max_steps=6"]
    assert run("tiny_ode", tmp_path / "split", moved) == USER_ERROR_EXIT_CODE
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "lr_decay_start: 3 -> 4" in line, line


# ------------------------------------------------------------------------------------------------
# 6. no pickle of ours in a run directory
# ------------------------------------------------------------------------------------------------
def test_rng_and_counters_are_stored_as_tensors(tmp_path):
    assert run("tiny_dmd", tmp_path, ["max_steps=1", "log_iters=1"]) == 0
    ckpt = load_checkpoint(tmp_path, 1)
    for entry in ("rng", "trainer", "sampler"):
        assert all(isinstance(v, torch.Tensor) for v in ckpt[entry].values()), entry
    rng = json.loads(bytes(ckpt["rng"]["json"].numpy()).decode())
    assert rng["world_size"] == 1 and set(rng["states"][0]) >= {"python", "numpy", "torch"}


# ------------------------------------------------------------------------------------------------
# 7/8. bad data: one message, exit code 2
# ------------------------------------------------------------------------------------------------
def test_truncated_lmdb_is_one_clear_error_before_training(tmp_path, toy_lmdb):
    import shutil

    data = tmp_path / "ode"
    shutil.copytree(toy_lmdb, data)
    mdb = data / "data.mdb"
    os.truncate(mdb, mdb.stat().st_size // 2)
    proc = subprocess.run(
        _cmd("configs/tiny_ode.yaml", tmp_path / "run", [f"data_path={data}", *QUIET]),
        env=subprocess_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == USER_ERROR_EXIT_CODE, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(mdb) in errors[0] and "truncated" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not metrics(tmp_path / "run")


@pytest.mark.slow
def test_user_error_under_torchrun_is_one_message_from_rank_zero(tmp_path):
    proc = subprocess.run(
        _cmd("configs/tiny_dmd.yaml", tmp_path, [f"data_path={tmp_path / 'missing.txt'}", *QUIET], nproc=2),
        env=subprocess_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert [line for line in out.splitlines() if line.startswith("error:")] == [
        line for line in out.splitlines() if "missing.txt" in line and line.startswith("error:")
    ]
    assert sum(line.startswith("error:") for line in out.splitlines()) == 1, out[-3000:]
    assert "Connection closed" not in out and 'train.py", line' not in out, out[-3000:]
    assert "exitcode  : 2" in out  # torchrun's summary reports each worker's code 2


# ------------------------------------------------------------------------------------------------
# 9. divergence
# ------------------------------------------------------------------------------------------------
def test_consecutive_nan_skips_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_step = train_module.Trainer._optimizer_step

    def wrecked_from_step_2(self, role):
        if self.state.step >= 2:  # as after an lr=1e30 step: every later loss is NaN
            monkeypatch.setattr(
                self.objective,
                "critic_loss",
                lambda b, s: (torch.tensor(float("nan"), requires_grad=True), {}),
            )
            monkeypatch.setattr(
                self.objective,
                "generator_loss",
                lambda b, s: (torch.tensor(float("nan"), requires_grad=True), {}),
            )
        return real_step(self, role)

    monkeypatch.setattr(train_module.Trainer, "_optimizer_step", wrecked_from_step_2)
    rc = run("tiny_dmd", tmp_path, ["max_steps=30", "log_iters=1", "max_nan_skips=3"])
    err = capsys.readouterr().err
    assert rc == USER_ERROR_EXIT_CODE
    assert "max_nan_skips=3" in err and "step_00000002" in err
    assert [s for s, _ in Checkpointer(tmp_path).complete_checkpoints()][-1] == 2
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["nan_streak"] == 3
    assert load_config().max_nan_skips == 20


# ------------------------------------------------------------------------------------------------
# 11. activation checkpointing on every network the objective backpropagates through
# ------------------------------------------------------------------------------------------------
def test_sid_trainer_checkpoints_the_teacher(tmp_path):
    cfg = load_config(ROOT / "configs/tiny_sid.yaml", [*QUIET, "max_steps=1"])
    trainer = train_module.Trainer(cfg, tmp_path, no_save=True)
    try:
        trainer.setup()
        assert trainer.real_score.model.gradient_checkpointing
        assert trainer.generator.model.gradient_checkpointing and trainer.critic.model.gradient_checkpointing
    finally:
        trainer.cleanup(ok=True)


# ------------------------------------------------------------------------------------------------
# 15. wandb gets the config; the rank that had the signal is named
# ------------------------------------------------------------------------------------------------
def test_wandb_run_gets_the_merged_config(tmp_path, monkeypatch):
    import sys
    import types

    calls: list[dict] = []

    class FakeRun:
        def log(self, *args, **kwargs) -> None: ...

        def finish(self) -> None: ...

    def init(**kwargs):
        calls.append(kwargs)
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    assert run("tiny_dmd", tmp_path, ["max_steps=1", "log_iters=1", "wandb_mode=offline", "lr=1e-4"]) == 0
    [kwargs] = calls
    saved = dataclasses.asdict(load_config(tmp_path / "config.yaml"))
    assert kwargs["config"] == saved and kwargs["config"]["lr"] == 1e-4 and kwargs["config"]["seed"] == 42


def _worker_pid(launcher_pid: int, rank: int, timeout: float = 120) -> int:
    """The pid of torchrun's worker with RANK=rank (found through /proc)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                env = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if ppid == launcher_pid and f"RANK={rank}".encode() in env:
                return int(proc.name)
        time.sleep(0.2)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher_pid}")


@pytest.mark.slow
def test_rank_zero_names_the_rank_that_received_the_signal(tmp_path):
    log = tmp_path / "out.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            _cmd(
                "configs/tiny_dmd.yaml",
                tmp_path / "run",
                ["max_steps=1000", "log_iters=1000", *QUIET],
                nproc=2,
            ),
            env=subprocess_env(),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            rank1 = _worker_pid(proc.pid, 1)
            jsonl = tmp_path / "run" / "metrics.jsonl"
            deadline = time.time() + 180
            while (not jsonl.exists() or len(jsonl.read_text().splitlines()) < 2) and time.time() < deadline:
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.1)
            os.kill(rank1, signal.SIGUSR1)  # only rank 1 is signalled
            assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert "on signal (rank 1: SIGUSR1)" in text, text[-3000:]
    assert len(Checkpointer(tmp_path / "run").complete_checkpoints()) == 1


@pytest.mark.slow
def test_sigterm_to_torchrun_leaves_a_complete_checkpoint_that_resumes(tmp_path):
    # What a cluster scheduler does on pre-emption: SIGTERM to the launcher, which forwards it to
    # every worker and then prints its own SignalException traceback (README, "Pre-emption").
    log = tmp_path / "out.txt"
    overrides = ["max_steps=1000", "log_iters=1000", *QUIET]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            _cmd("configs/tiny_dmd.yaml", tmp_path / "run", overrides, nproc=2),
            env=subprocess_env(),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            jsonl = tmp_path / "run" / "metrics.jsonl"
            deadline = time.time() + 180
            while (not jsonl.exists() or len(jsonl.read_text().splitlines()) < 2) and time.time() < deadline:
                assert proc.poll() is None, log.read_text()[-3000:]
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
    [(step, path)] = Checkpointer(tmp_path / "run").complete_checkpoints()
    assert step >= 2, log.read_text()[-3000:]
    resumed = subprocess.run(
        _cmd("configs/tiny_dmd.yaml", tmp_path / "run", [f"max_steps={step + 1}", *QUIET]),
        env=subprocess_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert resumed.returncode == 0 and f"resumed from step {step}" in resumed.stderr, resumed.stderr[-3000:]
    assert [r["step"] for r in metrics(tmp_path / "run")] == list(range(1, step + 2))
