"""The trainer end to end on the toy world (tiny configs, CPU, gloo; torchrun with 2 processes).

Checks: every objective trains and saves; 2 ranks x 1 micro-batch == 1 rank x 2 micro-batches;
resume after kill -9 is bitwise exact; a 1-process checkpoint resumes on 2 processes; SIGTERM saves a
checkpoint that resumes; a NaN step is skipped and never saved; a config typo fails fast.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.dist_helpers import free_port, subprocess_env
from utils.lmdb import LMDBWriter

from .lmdb_helpers import write_toy_ode_lmdb

ROOT = Path(__file__).resolve().parents[1]
FAST = ["max_steps=3", "log_iters=3", "sample_every=0", "wandb_mode=disabled"]


def _cmd(config: str, logdir: Path, overrides: list[str], nproc: int = 1) -> list[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
        ]
        launcher += ["--master_port", str(free_port())]
    return [
        *launcher,
        str(ROOT / "train.py"),
        "--config",
        str(ROOT / config),
        "--logdir",
        str(logdir),
        *overrides,
    ]


def train(config: str, logdir: Path, overrides: list[str], nproc: int = 1, timeout: float = 240) -> str:
    proc = subprocess.run(
        _cmd(config, logdir, overrides, nproc),
        env=subprocess_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(f"train.py exited with {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc.stdout + proc.stderr


def _descendants(pid: int) -> list[int]:
    """Every living process below `pid` (Linux /proc): torchrun starts each worker in a session of its
    own, so killing the launcher's process group would leave the workers running."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4; the name in (...) may hold spaces
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_after_checkpoint(
    config: str, logdir: Path, overrides: list[str], step: int, nproc: int = 1, wait_s: float = 180
) -> Path:
    """Start a run (under torchrun with `nproc` > 1) and kill -9 it as soon as the checkpoint of `step`
    is complete on disk; returns that checkpoint's COMPLETE marker (which the caller checks exists).

    Every process of the run (the launcher and all its descendants, whatever session they are in) is
    killed at once, as a lost node loses every process."""
    proc = subprocess.Popen(
        _cmd(config, logdir, overrides, nproc),
        env=subprocess_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    marker = logdir / "checkpoints" / f"step_{step:08d}" / "COMPLETE"
    deadline = time.time() + wait_s
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    for pid in (*_descendants(proc.pid), proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # already ended (the caller's checks will say whether too early)
            pass
    proc.wait()
    return marker


def load_checkpoint(logdir: Path, step: int) -> dict:
    ckpt = logdir / "checkpoints" / f"step_{step:08d}"
    assert (ckpt / "COMPLETE").exists(), (
        f"no complete checkpoint at step {step}: {list((logdir / 'checkpoints').iterdir())}"
    )
    out = logdir / f"ckpt_{step}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    return torch.load(out, weights_only=False)


def weights(ckpt: dict) -> dict[str, torch.Tensor]:
    """Generator, critic and EMA tensors of a loaded checkpoint, flattened."""
    out = {f"generator.{k}": v for k, v in ckpt["generator"]["model"].items()}
    if "critic" in ckpt:
        out.update({f"critic.{k}": v for k, v in ckpt["critic"]["model"].items()})
    if "ema" in ckpt:
        out.update({f"ema.{k}": v for k, v in ckpt["ema"].items()})
    return out


def metrics(logdir: Path) -> list[dict]:
    return [json.loads(line) for line in (logdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def toy_lmdb(tmp_path_factory) -> Path:
    """ODE-trajectory rows [K+1=5, F=6, C=4, 8, 8] (LMDB): ODE data, and clean latents via row[-1]."""
    path = tmp_path_factory.mktemp("data") / "toy_ode"
    return write_toy_ode_lmdb(path)


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config", ["tiny_dmd", "tiny_sid", "tiny_gan", "tiny_ode", "tiny_causal_diffusion", "tiny_causvid"]
)
def test_each_trainer_runs_three_steps_and_saves(config, tmp_path, toy_lmdb):
    overrides = list(FAST)
    if config not in ("tiny_dmd", "tiny_sid"):
        overrides.append(f"data_path={toy_lmdb}")
    if config in ("tiny_dmd", "tiny_ode"):  # sample videos with (dmd) and without (ode) EMA
        overrides.append("sample_every=3")
    if config == "tiny_ode":
        overrides.append("ema_weight=0")
    train(f"configs/{config}.yaml", tmp_path, overrides)
    if "sample_every=3" in overrides:
        for kind in ("mp4", "png"):
            assert (tmp_path / "samples" / f"sample0_step00000003.{kind}").stat().st_size > 0
    ckpt = load_checkpoint(tmp_path, 3)
    assert ckpt["trainer"]["step"] == 3 and ckpt["trainer"]["nan_skips"] == 0
    assert all(torch.isfinite(v).all() for v in weights(ckpt).values())
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all("generator_loss" in r or "critic_loss" in r for r in rows)
    assert (tmp_path / "config.yaml").exists()


@pytest.mark.parametrize("config", ["tiny_dmd", "tiny_sid", "tiny_gan"])
def test_two_ranks_equal_one_rank_with_accumulation(config, tmp_path, toy_lmdb):
    # SiD and GAN differentiate with autograd.grad through FSDP2 modules: covered here too.
    common = [
        "max_steps=2",
        "log_iters=2",
        "sample_every=0",
        "dfake_gen_update_ratio=1",
        "total_batch_size=2",
    ]
    if config == "tiny_gan":
        common.append(f"data_path={toy_lmdb}")
    train(f"configs/{config}.yaml", tmp_path / "two", common, nproc=2)
    train(f"configs/{config}.yaml", tmp_path / "one", common, nproc=1)
    two, one = weights(load_checkpoint(tmp_path / "two", 2)), weights(load_checkpoint(tmp_path / "one", 2))
    assert two.keys() == one.keys()
    for k in two:
        assert torch.allclose(two[k], one[k], rtol=1e-5, atol=1e-6), k
    # and training did move the generator away from its initial weights (the toy teacher's)
    from wan import WanConfig
    from wan.toy import toy_dit_state_dict

    start = toy_dit_state_dict(WanConfig.preset("tiny"))
    assert any(not torch.allclose(one[f"generator.model.{k}"], v) for k, v in start.items())


def test_resume_after_kill_is_bitwise_exact(tmp_path):
    common = ["max_steps=8", "sample_every=0", "dfake_gen_update_ratio=2", "ema_start_step=2"]
    train("configs/tiny_dmd.yaml", tmp_path / "straight", [*common, "log_iters=100"])
    # Interrupted run: checkpoint every 4 steps, kill -9 as soon as step 4 is on disk.
    logdir = tmp_path / "killed"
    marker = kill_after_checkpoint("configs/tiny_dmd.yaml", logdir, [*common, "log_iters=4"], step=4)
    assert marker.exists() and not (logdir / "checkpoints" / "step_00000008").exists(), (
        "kill did not land mid-run"
    )
    out = train("configs/tiny_dmd.yaml", logdir, [*common, "log_iters=4"])
    assert "resumed from step 4" in out
    a, b = weights(load_checkpoint(tmp_path / "straight", 8)), weights(load_checkpoint(logdir, 8))
    assert (
        a.keys() == b.keys()
        and any(k.startswith("ema.") for k in a)
        and any(k.startswith("critic.") for k in a)
    )
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoint_from_one_process_resumes_on_two(tmp_path):
    # 8 prompts, 2 phases x 2 micro-batches per step: 2 steps consume exactly one epoch, so the data
    # stream continues identically at either world size and the runs must agree.
    common = ["sample_every=0", "dfake_gen_update_ratio=1", "total_batch_size=2", "ema_start_step=1"]
    train("configs/tiny_dmd.yaml", tmp_path / "straight", [*common, "max_steps=4", "log_iters=4"])
    logdir = tmp_path / "resumed"
    train("configs/tiny_dmd.yaml", logdir, [*common, "max_steps=2", "log_iters=2"], nproc=1)
    out = train("configs/tiny_dmd.yaml", logdir, [*common, "max_steps=4", "log_iters=4"], nproc=2)
    assert "resumed from step 2" in out
    a, b = weights(load_checkpoint(tmp_path / "straight", 4)), weights(load_checkpoint(logdir, 4))
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_signal_saves_a_checkpoint_that_resumes(tmp_path, sig):
    overrides = ["max_steps=1000", "log_iters=1000", "sample_every=0"]
    proc = subprocess.Popen(
        _cmd("configs/tiny_dmd.yaml", tmp_path, overrides),
        env=subprocess_env(),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    jsonl = tmp_path / "metrics.jsonl"
    deadline = time.time() + 180
    while (not jsonl.exists() or len(jsonl.read_text().splitlines()) < 2) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 0
    saved = sorted((tmp_path / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and (saved[0] / "COMPLETE").exists()
    step = int(saved[0].name.split("_")[1])
    assert 2 <= step < 1000
    out = train(
        "configs/tiny_dmd.yaml", tmp_path, ["max_steps=" + str(step + 1), "log_iters=1000", "sample_every=0"]
    )
    assert f"resumed from step {step}" in out
    assert metrics(tmp_path)[-1]["step"] == step + 1


def test_nan_step_is_skipped_and_not_saved(tmp_path, monkeypatch):
    import train as train_module
    from utils.config import load_config

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(
        ROOT / "configs/tiny_dmd.yaml",
        ["max_steps=4", "log_iters=4", "sample_every=0", "dfake_gen_update_ratio=1"],
    )
    trainer = train_module.Trainer(cfg, tmp_path)
    ok = False
    try:
        trainer.setup()
        real_loss = trainer.objective.generator_loss

        def poisoned(batch, shared):
            loss, m = real_loss(batch, shared)
            return (loss * float("nan") if trainer.state.step == 1 else loss), m

        monkeypatch.setattr(trainer.objective, "generator_loss", poisoned)
        trainer.train()
        ok = True
    finally:
        trainer.cleanup(ok)
    rows = metrics(tmp_path)
    assert rows[1].get("generator_skipped") == 1.0 and rows[-1]["nan_skips"] == 1
    ckpt = load_checkpoint(tmp_path, 4)
    assert ckpt["trainer"]["nan_skips"] == 1
    assert all(torch.isfinite(v).all() for v in weights(ckpt).values())


@pytest.mark.parametrize(
    "override, culprit, suggestion",
    [("lr_critc=1e-4", "lr_critc", "lr_critic"), ("model_kwargs.sink_sise=1", "sink_sise", "sink_size")],
)
def test_config_typo_fails_fast_naming_the_key(tmp_path, override, culprit, suggestion):
    started = time.time()
    proc = subprocess.run(
        _cmd("configs/tiny_dmd.yaml", tmp_path, [override]),
        env=subprocess_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert culprit in proc.stderr and suggestion in proc.stderr
    assert not (tmp_path / "checkpoints").exists()
    assert time.time() - started < 60


def test_gan_head_lr_multiplier_warmup_and_tap_layers(tmp_path, toy_lmdb):
    # Upstream's GAN keys: the head trains at lr_critic x discriminator_lr_multiplier; during
    # discriminator_warmup_steps only the head trains (generator and critic body wait).
    overrides = [
        f"data_path={toy_lmdb}",
        "max_steps=3",
        "log_iters=1",
        "sample_every=0",
        "dfake_gen_update_ratio=1",
    ]
    overrides += ["discriminator_warmup_steps=2", "discriminator_lr_multiplier=3", "gan_tap_layers=[0,1]"]
    train("configs/tiny_gan.yaml", tmp_path, overrides)
    from wan import WanConfig
    from wan.toy import toy_dit_state_dict

    start = toy_dit_state_dict(WanConfig.preset("tiny"))
    after_warmup, after = load_checkpoint(tmp_path, 2), load_checkpoint(tmp_path, 3)
    for k, v in start.items():
        assert torch.equal(after_warmup["generator"]["model"][f"model.{k}"], v), k
        assert torch.equal(after_warmup["critic"]["model"][f"model.{k}"], v), k
    head = [k for k in after["critic"]["model"] if not k.startswith("model.")]
    assert any(
        not torch.equal(
            load_checkpoint(tmp_path, 1)["critic"]["model"][k], after_warmup["critic"]["model"][k]
        )
        for k in head
    )
    assert any(not torch.equal(after["critic"]["model"][f"model.{k}"], v) for k, v in start.items())
    assert {k.split(".")[1] for k in head if k.startswith("_gan_ca_blocks.")} == {"0", "1"}
    lrs = sorted(g["lr"] for g in after["critic"]["optim"]["param_groups"])
    assert lrs[1] == pytest.approx(3 * lrs[0])
    assert ["generator_loss" in r for r in metrics(tmp_path)] == [False, False, True]


def test_image_to_video_dmd_trains_on_video_latents(tmp_path):
    # configs/tiny_dmd_i2v.yaml: the first latent frame of a real clip conditions the rollout
    # ([1, N, N] blocks); clips of any length serve (6 frames here, 7 rolled out); the sample videos
    # continue the data's first frames too.
    data = tmp_path / "latents"
    g = torch.Generator().manual_seed(1)
    with LMDBWriter(data) as writer:
        for i in range(4):
            writer.write(f"clip {i}", torch.randn(6, 4, 8, 8, generator=g))
    train("configs/tiny_dmd_i2v.yaml", tmp_path / "run", [f"data_path={data}", *FAST, "sample_every=3"])
    assert load_checkpoint(tmp_path / "run", 3)["trainer"]["step"] == 3
    assert list((tmp_path / "run" / "samples").glob("*sample0*"))


def test_generator_ckpt_accepts_an_exported_or_upstream_pt(tmp_path):
    # generator_ckpt: an upstream-format .pt ({"generator": {"model.<key>": ...}}); lr 0 keeps it.
    from wan import WanConfig
    from wan.toy import toy_dit_state_dict
    from wan.weights import write_self_forcing_pt

    init = {
        k: v + 0.01 * torch.randn_like(v) for k, v in toy_dit_state_dict(WanConfig.preset("tiny")).items()
    }
    write_self_forcing_pt(tmp_path / "ode_init.pt", generator=init)
    train(
        "configs/tiny_dmd.yaml",
        tmp_path / "run",
        [f"generator_ckpt={tmp_path / 'ode_init.pt'}", "lr=0", *FAST],
    )
    gen = load_checkpoint(tmp_path / "run", 3)["generator"]["model"]
    for k, v in init.items():
        assert torch.equal(gen[f"model.{k}"], v), k


def test_ode_regression_learns_on_the_toy_world(tmp_path):
    # End-to-end sanity of the optimizer wiring: on the toy teacher's own ODE pairs (x0 is a
    # deterministic function of the noise) the regression loss falls.
    ode = [
        sys.executable,
        str(ROOT / "scripts/generate_ode_pairs.py"),
        "--prompts",
        str(ROOT / "configs/prompts_toy.txt"),
    ]
    ode += ["--out", str(tmp_path / "ode"), "--model", "tiny", "--weights", "toy", "--text_encoder", "toy"]
    ode += ["--latent_frames", "6", "--latent_height", "8", "--latent_width", "8", "--num_steps", "8"]
    ode += ["--keep_indices", "0", "2", "4", "6", "-1"]
    proc = subprocess.run(ode, env=subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    overrides = [f"data_path={tmp_path / 'ode'}", "max_steps=60", "log_iters=1000", "sample_every=0"]
    train("configs/tiny_ode.yaml", run, [*overrides, "lr=1e-3", "beta1=0.9"])
    losses = [r["generator_loss"] for r in metrics(run)]
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10]), losses


def test_text_encoder_from_a_diffusers_folder_is_read_by_rank_zero_and_broadcast(tmp_path):
    # A tiny umT5 saved in diffusers layout (text_encoder/ + tokenizer/): the structure-only build
    # (non-zero ranks, on meta) has exactly the loaded model's tensors, and a 2-rank run trains with
    # it. (That the broadcast weights are right is covered by 2 ranks == 1 rank above, which uses the
    # same meta + rank-0 broadcast path for the toy encoder.)
    from model.build import build_text_encoder
    from utils.config import load_config
    from wan.toy import toy_text_encoder

    folder = tmp_path / "wan_folder"
    toy = toy_text_encoder(seed=7)
    toy.encoder.save_pretrained(folder / "text_encoder")
    toy.tokenizer.save_pretrained(folder / "tokenizer")
    cfg = load_config(ROOT / "configs/tiny_dmd.yaml", [f"text_encoder_path={folder}"])
    with torch.device("meta"):
        meta = build_text_encoder(cfg, torch.device("meta"), structure_only=True)
    full = build_text_encoder(cfg, torch.device("cpu"))
    assert {k: v.shape for k, v in meta.state_dict().items()} == {
        k: v.shape for k, v in full.state_dict().items()
    }
    train("configs/tiny_dmd.yaml", tmp_path / "run", [f"text_encoder_path={folder}", *FAST], nproc=2)
    assert load_checkpoint(tmp_path / "run", 3)["trainer"]["step"] == 3


def test_mixed_precision_trains_in_bf16_with_fp32_master_weights(tmp_path):
    # mixed_precision: FSDP2 computes in bf16 (noise, caches, text embeddings in bf16), the sharded
    # master weights, optimizer state and checkpoints stay fp32.
    train("configs/tiny_dmd.yaml", tmp_path, ["mixed_precision=true", *FAST, "sample_every=3"])
    ckpt = load_checkpoint(tmp_path, 3)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights(ckpt).values())
    assert all(math.isfinite(r["critic_loss"]) for r in metrics(tmp_path))
    assert (tmp_path / "samples" / "sample0_step00000003.mp4").exists()
