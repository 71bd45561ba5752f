"""DCP checkpoints: bitwise round trip, interrupted saves, pruning, NaN refusal, resharding, export."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

import utils.checkpoint as checkpoint_mod
from tests.dist_helpers import (
    DIST_SCRIPTS,
    ToyNet,
    assert_check,
    load_check_results,
    run_torchrun,
    single_process_group,
)
from utils.checkpoint import (
    COMPLETE_MARKER,
    Checkpointer,
    CheckpointError,
    ModelState,
    NonFiniteCheckpointError,
    SchedulerState,
    export_upstream_pt,
    gather_full_state_dict,
)
from utils.distributed import build_mesh, shard_model
from utils.ema import EMA
from utils.optim import apply_schedule, build_scheduler


class Sampler:
    """A data sampler's position: arbitrary small python state."""

    def __init__(self) -> None:
        self.position = 0
        self.order = [0, 1, 2]

    def state_dict(self) -> dict:
        return {"position": self.position, "order": list(self.order)}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.order = state["position"], list(state["order"])


@pytest.fixture
def world1():
    with single_process_group() as info:
        yield info


def build(info, seed: int, sharded: bool = True):
    torch.manual_seed(seed)
    model = ToyNet()
    if sharded:
        shard_model(model, build_mesh("full", 1, 1, device_type=info.device.type), mixed_precision=False)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, optim


def train_steps(model, optim, n: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        optim.zero_grad()
        model(torch.randn(4, 5, generator=gen)).square().mean().backward()
        optim.step()


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def snapshot(model, optim, ema) -> dict:
    optim_sd = get_optimizer_state_dict(model, optim)["state"]
    return {
        "model": {k: full(v).clone() for k, v in model.state_dict().items()},
        "optim": {n: {k: full(v).clone() for k, v in s.items()} for n, s in optim_sd.items()},
        "ema": {k: full(v).clone() for k, v in ema.state_dict().items()},
    }


def assert_snapshot_equal(a: dict, b: dict) -> None:
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["optim"].keys() == b["optim"].keys()
    for n in a["optim"]:
        for k in a["optim"][n]:
            assert torch.equal(a["optim"][n][k], b["optim"][n][k]), ("optim", n, k)


def rng_draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(4).tolist()


def test_round_trip_restores_everything_bitwise(world1, tmp_path):
    model, optim = build(world1, seed=0)
    ema, sampler = EMA(model), Sampler()
    train_steps(model, optim, 3, seed=1)
    ema.update(model, 0.9)
    sampler.position, sampler.order = 17, [2, 0, 1]
    extra = {"step": 3, "tokens_seen": torch.tensor(1234.5)}
    state = {"gen": ModelState(model, optim), "ema": ema, "sampler": sampler, "extra": extra}

    ckpt = Checkpointer(tmp_path, keep_last=3)
    path = ckpt.save(3, state)
    assert path == tmp_path / "checkpoints" / "step_00000003" and (path / COMPLETE_MARKER).is_file()
    saved = snapshot(model, optim, ema)
    expected_draws = rng_draws()  # what the run would draw next had it not stopped

    # A fresh process: different weights, untouched optimizer, other RNG and python state.
    model2, optim2 = build(world1, seed=42)
    ema2, sampler2 = EMA(model2), Sampler()
    extra2 = {"step": 0, "tokens_seen": torch.tensor(0.0)}
    torch.manual_seed(777), random.seed(777), np.random.seed(777)
    state2 = {"gen": ModelState(model2, optim2), "ema": ema2, "sampler": sampler2, "extra": extra2}
    assert Checkpointer(tmp_path, keep_last=3).load_latest(state2) == 3
    assert_snapshot_equal(snapshot(model2, optim2, ema2), saved)
    assert (sampler2.position, sampler2.order) == (17, [2, 0, 1])
    assert extra2["step"] == 3 and torch.equal(extra2["tokens_seen"], torch.tensor(1234.5))
    assert rng_draws() == expected_draws

    # Continuing from the checkpoint equals continuing the original run.
    train_steps(model, optim, 2, seed=5)
    train_steps(model2, optim2, 2, seed=5)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(full(a), full(b)), name


def test_no_checkpoint_returns_none(world1, tmp_path):
    model, optim = build(world1, seed=0)
    assert Checkpointer(tmp_path).load_latest({"gen": ModelState(model, optim)}) is None


def test_interrupted_saves_are_ignored_and_cleaned(world1, tmp_path, monkeypatch):
    model, optim = build(world1, seed=0)
    state = {"gen": ModelState(model, optim)}
    ckpt = Checkpointer(tmp_path, keep_last=5)
    ckpt.save(1, state)
    good = {k: full(v).clone() for k, v in model.state_dict().items()}

    # (a) killed after the rename, before COMPLETE: a full DCP directory with newer weights but no marker.
    train_steps(model, optim, 1, seed=3)

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint_mod, "_write_marker", die)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(2, state)
    monkeypatch.undo()
    assert (tmp_path / "checkpoints" / "step_00000002").is_dir()
    # (b) killed while DCP was writing: only a temp directory with partial files.
    partial = tmp_path / "checkpoints" / ".tmp_step_00000003"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"\x00" * 10)

    model2, optim2 = build(world1, seed=9)
    assert ckpt.load_latest({"gen": ModelState(model2, optim2)}) == 1
    for k, v in model2.state_dict().items():
        assert torch.equal(full(v), good[k]), k

    ckpt.save(4, state)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000001", "step_00000004"]


def test_keep_last_prunes_oldest(world1, tmp_path):
    model, optim = build(world1, seed=0)
    state = {"gen": ModelState(model, optim)}
    ckpt = Checkpointer(tmp_path, keep_last=2)
    for step in (10, 20, 30, 40):
        ckpt.save(step, state)
    assert [s for s, _ in ckpt.complete_checkpoints()] == [30, 40]
    keep_all = Checkpointer(tmp_path / "all", keep_last=0)
    for step in (1, 2, 3):
        keep_all.save(step, state)
    assert [s for s, _ in keep_all.complete_checkpoints()] == [1, 2, 3]


def test_non_finite_state_is_refused(world1, tmp_path):
    model, optim = build(world1, seed=0)
    train_steps(model, optim, 1, seed=1)
    ckpt = Checkpointer(tmp_path)
    with torch.no_grad():
        model.blocks[1].fc2.weight.to_local()[0, 0] = float("nan")
    with pytest.raises(NonFiniteCheckpointError, match=r"gen\.model\.blocks\.1\.fc2\.weight"):
        ckpt.save(1, {"gen": ModelState(model, optim)})
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())

    model, optim = build(world1, seed=0)
    train_steps(model, optim, 1, seed=1)
    with torch.no_grad():
        optim.state[model.head.weight]["exp_avg_sq"].to_local()[0, 0] = float("inf")
    with pytest.raises(NonFiniteCheckpointError, match=r"exp_avg_sq"):
        ckpt.save(2, {"gen": ModelState(model, optim)})
    assert ckpt.latest() is None


def test_one_process_checkpoint_loads_on_two_processes(tmp_path):
    run_dir, ref_path, out = tmp_path / "run", tmp_path / "ref.pt", tmp_path / "results"
    out.mkdir()
    with single_process_group() as info:
        model, optim = build(info, seed=0)
        ema, sampler = EMA(model), Sampler()
        train_steps(model, optim, 2, seed=1)
        ema.update(model, 0.5)
        sampler.position = 11
        Checkpointer(run_dir, keep_last=2).save(
            6, {"gen": ModelState(model, optim), "ema": ema, "sampler": sampler}
        )
        ref = snapshot(model, optim, ema)
    torch.save({**ref, "step": 6, "position": 11}, ref_path)
    run_torchrun(DIST_SCRIPTS / "checkpoint_checks.py", [run_dir, ref_path, out], nproc=2)
    results = load_check_results(out, 2)
    assert_check(results, "reshard_load")
    assert_check(results, "same_world_rng")


def test_export_upstream_pt(world1, tmp_path):
    model, _ = build(world1, seed=0)
    wrapper = torch.nn.Module()
    wrapper.model = model  # WanDiffusionWrapper layout: keys gain upstream's "model." prefix
    full_sd = gather_full_state_dict(wrapper)
    assert all(not hasattr(v, "full_tensor") for v in full_sd.values())
    bf16_ema = {k: v.to(torch.bfloat16) for k, v in full_sd.items()}
    path = export_upstream_pt(tmp_path / "out" / "model.pt", full_sd, critic_sd=full_sd, ema_sd=bf16_ema)
    loaded = torch.load(path)
    assert set(loaded) == {"generator", "critic", "generator_ema"}
    for entry in loaded.values():
        assert set(entry) == {f"model.{k}" for k in ToyNet().state_dict()}
        assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in entry.values())
    for k, v in full_sd.items():
        assert torch.equal(loaded["generator"][k], v)
        assert torch.equal(loaded["generator_ema"][k], v.to(torch.bfloat16).float())
    only_gen = torch.load(export_upstream_pt(tmp_path / "g.pt", full_sd))
    assert set(only_gen) == {"generator"}

    with pytest.raises(ValueError, match=r"'blocks.0.fc1.weight' lacks the 'model.' prefix"):
        export_upstream_pt(tmp_path / "bad.pt", {"blocks.0.fc1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="DTensor"):
        export_upstream_pt(tmp_path / "bad.pt", {f"model.{k}": v for k, v in model.state_dict().items()})

    # A GAN critic's head keys sit beside `model.` (upstream's wrapper layout), only in the critic.
    head = {"_cls_pred_branch.1.weight": torch.ones(2), "_register_tokens.register_tokens": torch.ones(1)}
    gan = torch.load(export_upstream_pt(tmp_path / "gan.pt", full_sd, critic_sd={**full_sd, **head}))
    assert torch.equal(gan["critic"]["_cls_pred_branch.1.weight"], torch.ones(2))
    with pytest.raises(ValueError, match="'_cls_pred_branch.1.weight' lacks"):
        export_upstream_pt(tmp_path / "bad.pt", {**full_sd, **head})


def test_load_refuses_incomplete_directory(world1, tmp_path):
    model, optim = build(world1, seed=0)
    ckpt = Checkpointer(tmp_path)
    path = ckpt.save(1, {"gen": ModelState(model, optim)})
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    (copy / COMPLETE_MARKER).unlink()
    with pytest.raises(CheckpointError, match="COMPLETE"):
        ckpt.load(copy, {"gen": ModelState(model, optim)})


def _step_all_but_head(model, optim, seed: int) -> None:
    """One AdamW step in which the head gets no gradient (so it never gets optimizer state)."""
    gen = torch.Generator().manual_seed(seed)
    optim.zero_grad()
    model(torch.randn(4, 5, generator=gen)).square().mean().backward()
    for p in model.head.parameters():
        p.grad = None
    optim.step()


def test_saving_an_unstepped_optimizer_does_not_change_its_next_step(world1, tmp_path):
    # Reference: an optimizer that was never saved. torch's get_optimizer_state_dict would give the
    # saved one step counters of 1 before its first step, so its first update would differ.
    ref_model, ref_optim = build(world1, seed=0)
    model, optim = build(world1, seed=0)
    Checkpointer(tmp_path).save(1, {"gen": ModelState(model, optim)})
    assert len(optim.state) == 0, "saving initialised optimizer state"
    train_steps(ref_model, ref_optim, 2, seed=3)
    train_steps(model, optim, 2, seed=3)
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(full(a), full(b)), name
    # ... and loading that unstepped checkpoint leaves a fresh optimizer without state.
    model2, optim2 = build(world1, seed=1)
    Checkpointer(tmp_path).load_latest({"gen": ModelState(model2, optim2)})
    assert len(optim2.state) == 0


def test_parameters_without_optimizer_state_save_load_and_continue_exactly(world1, tmp_path):
    # The GAN critic's DiT output head never gets a gradient: its AdamW state does not exist.
    straight, straight_optim = build(world1, seed=0)
    _step_all_but_head(straight, straight_optim, seed=1)
    model, optim = build(world1, seed=0)
    _step_all_but_head(model, optim, seed=1)
    Checkpointer(tmp_path).save(1, {"gen": ModelState(model, optim)})

    resumed, resumed_optim = build(world1, seed=7)
    Checkpointer(tmp_path).load_latest({"gen": ModelState(resumed, resumed_optim)})
    head = {id(p) for p in resumed.head.parameters()}
    assert all(id(p) not in head for p in resumed_optim.state), "state invented for unstepped params"
    assert len(resumed_optim.state) == len(optim.state)
    # Both continue with a step that does train the head (its first): identical results.
    train_steps(straight, straight_optim, 1, seed=2)
    train_steps(resumed, resumed_optim, 1, seed=2)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(full(a), full(b)), name


def test_scheduler_state_loads_a_checkpoint_written_before_a_multiplier_field(world1, tmp_path):
    # Checkpoints used to hold LambdaLR's own state dict, the multiplier's fields included; a
    # WarmupDecay of that time had no decay_start, so a run saved then could not resume once it had one.
    _, optim = build(world1, seed=0)
    old = build_scheduler(optim, warmup_steps=2, schedule="linear", decay_steps=10, min_ratio=0.1)
    for _ in range(5):
        optim.step()
        old.step()
    del old.lr_lambdas[0].decay_start
    Checkpointer(tmp_path).save(5, {"lr": old})
    _, optim2 = build(world1, seed=0)
    with pytest.raises(CheckpointError, match="decay_start"):  # loaded as before: the missing field
        Checkpointer(tmp_path).load_latest({"lr": build_scheduler(optim2, 2, "linear", 10, 0.1)})
    # Through SchedulerState the position comes back and the multiplier stays as this run built it
    # (here a step down at 7 to 0.1 of the peak 1e-2, which the saved run did not have).
    new = build_scheduler(optim2, 2, "step", 1, 0.1, decay_start=7)
    assert Checkpointer(tmp_path).load_latest({"lr": SchedulerState(new)}) == 5
    assert (new.last_epoch, new._step_count, new.base_lrs) == (5, old._step_count, [1e-2])
    assert vars(new.lr_lambdas[0]) == {
        "warmup_steps": 2, "schedule": "step", "decay_steps": 1, "min_ratio": 0.1, "decay_start": 7
    }  # fmt: skip
    apply_schedule(new)
    lrs = []
    for _ in range(3):
        lrs.append(optim2.param_groups[0]["lr"])
        optim2.step()
        new.step()
    assert lrs == [1e-2, 1e-2, 1e-2 * 0.1]  # steps 5, 6: the peak; 7: lr_min
    # New checkpoints hold the position only: the same round trip, nothing of the multiplier saved.
    Checkpointer(tmp_path / "new").save(8, {"lr": SchedulerState(new)})
    again = build_scheduler(build(world1, seed=0)[1], 2, "step", 1, 0.1, decay_start=7)
    assert Checkpointer(tmp_path / "new").load_latest({"lr": SchedulerState(again)}) == 8
    assert (again.last_epoch, again._last_lr) == (new.last_epoch, new._last_lr)
    assert "lr_lambdas" not in SchedulerState(new).state_dict()
