"""LoRA distillation (peft) on the toy networks, and the training-loop features that came with it:
EMA at several rates, LR decay schedules, activation offload.

References: the toy weights the base started from (bitwise), an uninterrupted run, 1 rank x 2
micro-batches, diffusers' `WanTransformer3DModel` with its own LoRA loaders, peft's `PeftModel`,
EMA and cosine formulas written out here, gradients without offload.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist_helpers import subprocess_env
from tests.test_train import ROOT, _cmd, kill_after_checkpoint, load_checkpoint, metrics, train
from tests.wan_helpers import diffusers_twin, randomize_
from utils.lora import (
    LoraSpec,
    LoraWeights,
    add_lora,
    is_lora_key,
    merge_lora,
    split_lora_state_dict,
)
from wan import CausalWanModel, WanConfig, WanModel
from wan.toy import toy_dit_state_dict

from .lmdb_helpers import write_toy_ode_lmdb

TINY = WanConfig.preset("tiny")
LORA = ["lora_rank=4", "lora_alpha=8", "wandb_mode=disabled"]
# A large LR so that a few steps move the adapters far enough for "with vs without" to be visible.
BIG_LR = ["lr=5e-3", "lr_critic=5e-3"]


def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in sd.items()}


def _adapters(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if is_lora_key(k)}


def _assert_base_untouched_and_adapters_trained(model_sd: dict[str, torch.Tensor]) -> None:
    base, lora = split_lora_state_dict(_strip(model_sd))
    start = toy_dit_state_dict(TINY)
    assert base.keys() == start.keys()
    for k, v in start.items():
        assert torch.equal(base[k], v), f"base weight {k} changed"
    b = [v for k, v in lora.items() if ".lora_B." in k]
    # peft starts B at zero: a non-zero B means the adapters were trained
    assert b and all(v.abs().max() > 0 for v in b)


def _check_optimizer_holds_adapters_only(ckpt: dict, role: str) -> None:
    state = ckpt[role]["optim"]["state"]
    adapters = {k for k in ckpt[role]["model"] if is_lora_key(k)}
    assert set(state) == adapters, sorted(set(state) ^ adapters)[:5]


@pytest.fixture(scope="module")
def ode_lmdb(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "toy_ode"
    return write_toy_ode_lmdb(path)


@pytest.fixture(scope="module")
def dmd_run(tmp_path_factory) -> Path:
    """LoRA on generator and critic, 3 DMD steps, two EMA rates, sample videos."""
    logdir = tmp_path_factory.mktemp("lora_dmd")
    overrides = [*LORA, *BIG_LR, "lora_base_model=generator,fake_score", "max_steps=3", "log_iters=3"]
    overrides += ["dfake_gen_update_ratio=1", "ema_weight=[0.9,0.99]", "ema_start_step=1", "sample_every=3"]
    train("configs/tiny_dmd.yaml", logdir, overrides)
    return logdir


@pytest.fixture(scope="module")
def ode_run(tmp_path_factory, ode_lmdb) -> Path:
    """LoRA ODE regression, a checkpoint after every step (the generator trajectory), two EMA rates."""
    logdir = tmp_path_factory.mktemp("lora_ode")
    overrides = [*LORA, *BIG_LR, f"data_path={ode_lmdb}", "lora_base_model=generator", "max_steps=4"]
    overrides += ["sample_every=0", "mixed_precision=true"]  # bf16 compute, fp32 adapters and EMAs
    overrides += ["log_iters=1", "keep_last_checkpoints=0", "ema_weight=[0.5,0.9]", "ema_start_step=1"]
    train("configs/tiny_ode.yaml", logdir, overrides)
    return logdir


# ------------------------------------------------------------------------------------------------
# Training: only adapters train; the base is bit-exact
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lora_dmd_trains_only_adapters_of_generator_and_critic(dmd_run):
    ckpt = load_checkpoint(dmd_run, 3)
    for role in ("generator", "critic"):
        _assert_base_untouched_and_adapters_trained(ckpt[role]["model"])
        _check_optimizer_holds_adapters_only(ckpt, role)
    for name in ("ema_0.9", "ema_0.99"):  # EMA of the adapters only (the base is its own average)
        assert set(ckpt[name]) == set(_adapters(ckpt["generator"]["model"]))
    assert (dmd_run / "samples" / "sample0_step00000003.mp4").stat().st_size > 0


@pytest.mark.slow
def test_lora_ode_trains_only_adapters(ode_run):
    ckpt = load_checkpoint(ode_run, 4)
    _assert_base_untouched_and_adapters_trained(ckpt["generator"]["model"])
    _check_optimizer_holds_adapters_only(ckpt, "generator")


@pytest.mark.slow
def test_lora_gan_critic_trains_adapters_and_its_head(tmp_path, ode_lmdb):
    # LoRA on the discriminator only: its DiT base stays frozen, the new classification head trains
    # in full beside the adapters, and the generator trains every weight.
    from wan.gan_head import GAN_HEAD_MODULES

    overrides = [*LORA, *BIG_LR, f"data_path={ode_lmdb}", "lora_base_model=fake_score", "max_steps=2"]
    overrides += ["log_iters=2", "dfake_gen_update_ratio=1", "sample_every=0", "mixed_precision=true"]
    train("configs/tiny_gan.yaml", tmp_path, overrides)
    ckpt = load_checkpoint(tmp_path, 2)
    critic = ckpt["critic"]["model"]
    head = {k for k in critic if k.split(".", 1)[0] in GAN_HEAD_MODULES}
    dit = {k: v for k, v in critic.items() if k not in head}
    _assert_base_untouched_and_adapters_trained(dit)
    assert set(ckpt["critic"]["optim"]["state"]) == head | set(_adapters(critic))
    start = toy_dit_state_dict(TINY)
    generator = ckpt["generator"]["model"]
    assert not any(is_lora_key(k) for k in generator)
    assert any(not torch.equal(generator[f"model.{k}"], v) for k, v in start.items())


@pytest.mark.slow
def test_two_ema_rates_each_follow_the_saved_generator_trajectory(ode_run):
    # The EMA starts at the end of step ema_start_step = 1 as a copy of the generator, then after every
    # later generator step: e_k = d e_{k-1} + (1 - d) w_k, for each rate d separately.
    traj = [_adapters(load_checkpoint(ode_run, k)["generator"]["model"]) for k in range(1, 5)]
    last = load_checkpoint(ode_run, 4)
    for rate in (0.5, 0.9):
        expected = {k: v.double() for k, v in traj[0].items()}
        for w in traj[1:]:
            expected = {k: rate * expected[k] + (1 - rate) * w[k].double() for k in expected}
        saved = last[f"ema_{rate}"]
        assert saved.keys() == expected.keys()
        for k, v in expected.items():
            torch.testing.assert_close(saved[k].double(), v, rtol=1e-6, atol=1e-9, msg=k)
    # the two rates really differ (the test could not pass with one EMA written twice)
    k = next(iter(expected))
    assert not torch.equal(last["ema_0.5"][k], last["ema_0.9"][k])


@pytest.mark.slow
def test_preset_lora_is_merged_into_the_base_and_lora_checkpoint_starts_the_adapters(tmp_path, ode_lmdb):
    from utils.lora import write_peft_adapter
    from wan.lora_weights import write_diffusers_lora

    def random_adapters(seed: int, rank: int, alpha: float) -> LoraWeights:
        model = WanModel(TINY)
        add_lora(model, LoraSpec(rank=rank, alpha=alpha))
        g = torch.Generator().manual_seed(seed)
        _, lora = split_lora_state_dict(model.state_dict())
        return LoraWeights({k: torch.randn(v.shape, generator=g) * 0.1 for k, v in lora.items()}, alpha, rank)

    preset, start = random_adapters(1, rank=2, alpha=6.0), random_adapters(2, rank=4, alpha=8.0)
    write_diffusers_lora(preset, tmp_path / "preset")  # diffusers' layout (alpha folded into B)
    write_peft_adapter(start, tmp_path / "start")
    overrides = [*LORA, f"data_path={ode_lmdb}", "lora_base_model=generator", "max_steps=1", "log_iters=1"]
    overrides += ["sample_every=0", "lr=0", f"preset_lora_path={tmp_path / 'preset'}"]
    overrides += [f"lora_checkpoint={tmp_path / 'start'}"]
    train("configs/tiny_ode.yaml", tmp_path / "run", overrides)
    base, lora = split_lora_state_dict(_strip(load_checkpoint(tmp_path / "run", 1)["generator"]["model"]))
    # base = toy weights + (alpha / r) B A of the preset, written out here in float64
    for k, w in toy_dit_state_dict(TINY).items():
        module = k.removesuffix(".weight")
        if f"{module}.lora_A.weight" in preset.state_dict:
            a, b = preset.state_dict[f"{module}.lora_A.weight"], preset.state_dict[f"{module}.lora_B.weight"]
            w = (w.double() + 3.0 * b.double() @ a.double()).float()
            assert not torch.equal(w, toy_dit_state_dict(TINY)[k])
        torch.testing.assert_close(base[k], w, rtol=0, atol=1e-6, msg=k)
    # lr = 0: the adapters are exactly the ones the run started from
    assert lora.keys() == start.state_dict.keys()
    for k, v in start.state_dict.items():
        assert torch.equal(lora[k], v), k


@pytest.mark.slow
def test_bad_target_module_is_one_clear_error_listing_valid_names(tmp_path):
    proc = subprocess.run(
        _cmd(
            "configs/tiny_dmd.yaml",
            tmp_path,
            [*LORA, "lora_base_model=generator", "lora_target_modules=q,qkv"],
        ),
        env=subprocess_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    error = [line for line in proc.stderr.splitlines() if "lora_target_modules" in line]
    assert error, proc.stderr[-3000:]
    assert "['qkv']" in error[-1]  # the culprit, and only it
    for valid in ("self_attn.q", "cross_attn.o", "ffn.0", "ffn.2"):
        assert valid in error[-1]


# ------------------------------------------------------------------------------------------------
# Merged == unmerged; diffusers' and peft's loaders read what we export
# ------------------------------------------------------------------------------------------------


def _random_lora_model(cls=WanModel, seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny DiT with random base weights and random (non-zero) adapters on the default targets."""
    model = randomize_(cls(TINY) if cls is WanModel else cls(TINY, num_frame_per_block=1), seed=seed)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, LoraSpec(rank=3, alpha=6.0))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_lora_key(name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval(), base


def _inputs(batch: int = 1, frames: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, TINY.in_dim, frames, 4, 4, generator=g)
    return (
        x,
        torch.rand(batch, generator=g) * 1000,
        torch.randn(batch, TINY.text_len, TINY.text_dim, generator=g),
    )


@pytest.mark.parametrize("cls", [WanModel, CausalWanModel])
@torch.no_grad()
def test_merged_equals_unmerged(cls):
    model, base = _random_lora_model(cls)
    _, lora = split_lora_state_dict(model.state_dict())
    merged = cls(TINY) if cls is WanModel else cls(TINY, num_frame_per_block=1)
    merged.load_state_dict(merge_lora(base, LoraWeights(lora, alpha=6.0, rank=3)))
    plain = cls(TINY) if cls is WanModel else cls(TINY, num_frame_per_block=1)
    plain.load_state_dict(base)
    x, t, c = _inputs()
    y_peft, y_merged, y_base = model(x, t, c), merged.eval()(x, t, c), plain.eval()(x, t, c)
    torch.testing.assert_close(y_merged, y_peft, rtol=1e-5, atol=1e-5)
    assert (y_base - y_peft).abs().max() > 1e-2  # the adapters matter


@torch.no_grad()
def test_exported_adapters_load_into_diffusers_and_peft(tmp_path):
    from diffusers.loaders import WanLoraLoaderMixin
    from peft import PeftModel

    from utils.lora import write_peft_adapter
    from wan.lora_weights import read_lora, write_diffusers_lora

    model, base = _random_lora_model(WanModel)
    _, lora_sd = split_lora_state_dict(model.state_dict())
    lora = LoraWeights(lora_sd, alpha=6.0, rank=3)  # alpha != rank: the scaling must survive export
    file = write_diffusers_lora(lora, tmp_path / "lora")
    write_peft_adapter(lora, tmp_path / "lora")
    ours = WanModel(TINY).eval()
    ours.load_state_dict(merge_lora(base, lora))
    x, t, c = _inputs(batch=2, frames=3)
    expected = ours(x, t, c)
    scale = max(1.0, expected.abs().max().item())

    # 1. the transformer's own loader
    ref = diffusers_twin(TINY, base)
    ref.load_lora_adapter(str(file), prefix="transformer", adapter_name="ours")
    got = ref(x, t, c).sample
    assert (got - expected).abs().max() <= 1e-5 * scale
    # 2. the Wan pipelines' loader (WanPipeline.load_lora_weights = lora_state_dict + load_lora_into_transformer)
    ref2 = diffusers_twin(TINY, base)
    sd, metadata = WanLoraLoaderMixin.lora_state_dict(str(file), return_lora_metadata=True)
    WanLoraLoaderMixin.load_lora_into_transformer(sd, transformer=ref2, metadata=metadata)
    assert (ref2(x, t, c).sample - expected).abs().max() <= 1e-5 * scale
    # 3. peft's own format
    plain = WanModel(TINY)
    plain.load_state_dict(base)
    assert (plain.eval()(x, t, c) - expected).abs().max() > 1e-2  # the adapters matter
    peft_model = PeftModel.from_pretrained(plain, str(tmp_path / "lora")).eval()
    torch.testing.assert_close(peft_model(x, t, c), expected, rtol=1e-5, atol=1e-5)
    # 4. and our reader gives back exactly what was written (peft folder wins over the diffusers file)
    back = read_lora(tmp_path / "lora")
    assert (back.alpha, back.rank) == (6.0, 3)
    assert all(torch.equal(back.state_dict[k], v) for k, v in lora_sd.items())


@pytest.mark.slow
def test_export_of_a_lora_run_matches_diffusers_and_inference_merged_equals_unmerged(dmd_run, tmp_path):
    import inference
    from pipeline.from_config import inference_pipeline
    from scripts.export_checkpoint import export
    from utils.config import load_config
    from wan.weights import read_self_forcing_pt

    out = tmp_path / "exported"
    export(dmd_run, out, merged_pt=True, use_ema=0.99)
    for folder in ("generator_lora", "critic_lora", "generator_ema_0.9_lora", "generator_ema_0.99_lora"):
        assert (out / folder / "pytorch_lora_weights.safetensors").is_file()
        assert (out / folder / "adapter_config.json").is_file()
    merged = read_self_forcing_pt(out / "model.pt", "generator")
    ours = WanModel(TINY)
    ours.load_state_dict(merged)
    ref = diffusers_twin(TINY, toy_dit_state_dict(TINY))
    ref.load_lora_adapter(
        str(out / "generator_lora" / "pytorch_lora_weights.safetensors"), prefix="transformer"
    )
    x, t, c = _inputs()
    with torch.no_grad():
        expected, got = ours.eval()(x, t, c), ref(x, t, c).sample
        plain = WanModel(TINY)
        plain.load_state_dict(toy_dit_state_dict(TINY))
        without = plain.eval()(x, t, c)
    assert (got - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())
    assert (without - expected).abs().max() > 1e-3

    # inference.py's --lora path, merged and unmerged, on the causal generator: the same latents
    cfg = load_config(ROOT / "configs/tiny_dmd.yaml", [])
    latents = {}
    for merge in (True, False):
        gen = inference.make_dit(cfg, "generator")
        gen.model.load_state_dict(toy_dit_state_dict(TINY))
        inference.apply_lora(gen.model, str(out / "generator_lora"), scale=0.7, merge=merge)
        gen.eval().requires_grad_(False)
        pipe = inference_pipeline(cfg, gen)  # the construction inference.py uses
        noise = torch.randn(1, 6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        cond = {"prompt_embeds": torch.randn(1, 8, TINY.text_dim, generator=torch.Generator().manual_seed(1))}
        with torch.no_grad():
            latents[merge] = pipe.inference(noise, cond, generator=torch.Generator().manual_seed(2)).latents
    torch.testing.assert_close(latents[True], latents[False], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_inference_cli_with_lora_and_ema_rate(dmd_run, tmp_path):
    import inference
    from scripts.export_checkpoint import export
    from utils.config import load_config

    export(dmd_run, tmp_path / "exported")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    base = [
        sys.executable,
        "inference.py",
        "--config",
        str(dmd_run / "config.yaml"),
        "--data_path",
        str(prompts),
    ]
    base += ["--num_output_frames", "3"]
    # one run: the generator of a LoRA run (its adapters merged, EMA rate 0.99) plus exported adapters
    extra = ["--checkpoint", str(dmd_run), "--use_ema", "0.99"]
    extra += ["--lora", str(tmp_path / "exported" / "generator_lora"), "--lora_scale", "0.5"]
    proc = subprocess.run(
        [*base, "--output_folder", str(tmp_path / "videos"), *extra],
        env=subprocess_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 1
    # a run with two EMA rates refuses a bare --use_ema and names the rates
    with pytest.raises(ValueError, match=r"\[0\.9, 0\.99\]"):
        inference.load_generator_weights(load_config(dmd_run / "config.yaml"), str(dmd_run), use_ema=True)


# ------------------------------------------------------------------------------------------------
# Multi-process, resume, LR schedule
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lora_two_ranks_equal_one_rank_with_accumulation(tmp_path):
    common = [*LORA, *BIG_LR, "lora_base_model=generator,fake_score", "max_steps=2", "log_iters=2"]
    common += ["dfake_gen_update_ratio=1", "total_batch_size=2", "sample_every=0"]
    train("configs/tiny_dmd.yaml", tmp_path / "two", common, nproc=2)
    train("configs/tiny_dmd.yaml", tmp_path / "one", common, nproc=1)
    two, one = load_checkpoint(tmp_path / "two", 2), load_checkpoint(tmp_path / "one", 2)
    for role in ("generator", "critic"):
        a, b = _adapters(two[role]["model"]), _adapters(one[role]["model"])
        assert a.keys() == b.keys() and a
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
        assert any(v.abs().max() > 0 for k, v in b.items() if ".lora_B." in k)


def _cosine(step: int, lr: float, lr_min: float, warmup: int, decay: int) -> float:
    """LR of optimizer step `step` (0-based): linear warm-up, then cosine from lr to lr_min over `decay`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min(1.0, (step - warmup) / decay)
    return lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * p))


@pytest.mark.slow
def test_lora_resume_after_kill_is_bitwise_exact_with_ema_rates_and_cosine_lr(tmp_path):
    common = [*LORA, "lora_base_model=generator,fake_score", "max_steps=8", "dfake_gen_update_ratio=1"]
    common += ["ema_weight=[0.9,0.99]", "ema_start_step=2", "lr_schedule=cosine", "lr_warmup_steps=2"]
    common += ["lr_decay_steps=4", "lr_min=1e-5", "lr_min_critic=2e-6", "sample_every=0"]
    train("configs/tiny_dmd.yaml", tmp_path / "straight", [*common, "log_iters=100"])
    logdir = tmp_path / "killed"
    marker = kill_after_checkpoint("configs/tiny_dmd.yaml", logdir, [*common, "log_iters=4"], step=4)
    assert marker.exists() and not (logdir / "checkpoints" / "step_00000008").exists()
    assert "resumed from step 4" in train("configs/tiny_dmd.yaml", logdir, [*common, "log_iters=4"])
    a, b = load_checkpoint(tmp_path / "straight", 8), load_checkpoint(logdir, 8)
    for entry in ("generator", "critic"):
        for k, v in a[entry]["model"].items():
            assert torch.equal(v, b[entry]["model"][k]), k
    for entry in ("ema_0.9", "ema_0.99"):
        assert a[entry].keys() == b[entry].keys()
        for k, v in a[entry].items():
            assert torch.equal(v, b[entry][k]), k
    # The LR of every step, before and after the restart, is the warm-up + cosine formula.
    rows = {r["step"]: r for r in metrics(logdir)}
    for step in range(1, 9):
        k = step - 1  # optimizer steps taken before this one
        assert rows[step]["generator_lr"] == pytest.approx(_cosine(k, 2e-4, 1e-5, 2, 4), rel=1e-9)
        assert rows[step]["critic_lr"] == pytest.approx(_cosine(k, 4e-5, 2e-6, 2, 4), rel=1e-9)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_lr_schedule_at_start_middle_end_and_after_a_state_dict_round_trip(schedule):
    # The trainer's scheduler (the end-to-end check with a real restart is the kill -9 test above).
    from utils.optim import build_scheduler

    def formula(k: int) -> float:
        if k < 2:
            return 1e-3 * (k + 1) / 2
        p = min(1.0, (k - 2) / 6)
        if schedule == "linear":
            return 1e-3 - (1e-3 - 1e-4) * p
        return _cosine(k, 1e-3, 1e-4, 2, 6)

    def make():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        return opt, build_scheduler(opt, 2, schedule, 6, 0.1)

    opt, sched = make()
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    opt2, sched2 = make()
    opt2.load_state_dict(opt.state_dict())  # as a resume does: the LR lives in the optimizer's groups
    sched2.load_state_dict(sched.state_dict())
    for _ in range(5):
        seen.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert seen == pytest.approx([formula(k) for k in range(10)], rel=1e-12)
    assert seen[5] == pytest.approx(1e-4 + (1e-3 - 1e-4) * 0.5, rel=1e-12)  # middle of the decay
    assert seen[-1] == pytest.approx(1e-4, rel=1e-12)  # the end, held


@pytest.mark.parametrize("schedule", ["step", "linear", "cosine"])
def test_lr_decay_start_holds_the_peak_then_decays_or_drops(schedule):
    """Warm-up 2, peak until optimizer step 5 (lr_decay_start), then the schedule over 4 steps to 0.1x."""
    from utils.optim import build_scheduler

    def formula(k: int) -> float:
        if k < 2:
            return 1e-3 * (k + 1) / 2
        if k < 5:
            return 1e-3
        if schedule == "step":
            return 1e-4
        p = min(1.0, (k - 5) / 4)
        if schedule == "linear":
            return 1e-3 - 9e-4 * p
        return 1e-4 + 9e-4 * 0.5 * (1.0 + math.cos(math.pi * p))

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = build_scheduler(opt, 2, schedule, 4, 0.1, decay_start=5)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([formula(k) for k in range(12)], rel=1e-12)
    with pytest.raises(ValueError, match="inside the warm-up"):
        build_scheduler(opt, 2, schedule, 4, 0.1, decay_start=1)


def test_lr_step_needs_its_start_and_a_start_after_the_warm_up():
    from utils.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="lr_schedule=step needs lr_decay_start"):
        load_config("configs/tiny_ode.yaml", ["lr_schedule=step", "lr_min=1e-5"])
    with pytest.raises(ConfigError, match="lr_decay_start=2 falls inside the warm-up"):
        load_config("configs/tiny_ode.yaml", ["lr_schedule=cosine", "lr_warmup_steps=3", "lr_decay_start=2"])


# ------------------------------------------------------------------------------------------------
# Activation offload
# ------------------------------------------------------------------------------------------------


def test_activation_offload_gives_identical_gradients(monkeypatch):
    import wan.modules as modules

    packed = []

    class CountingSaveOnCpu(torch.autograd.graph.save_on_cpu):
        def __init__(self, pin_memory: bool = False) -> None:
            super().__init__(pin_memory=pin_memory)
            pack = self.pack_hook

            def counting(tensor):
                packed.append(tensor.shape)
                return pack(tensor)

            self.pack_hook = counting

    monkeypatch.setattr(modules.torch.autograd.graph, "save_on_cpu", CountingSaveOnCpu)
    grads = {}
    for offload in (False, True):
        torch.manual_seed(0)
        model = randomize_(CausalWanModel(TINY, num_frame_per_block=1), seed=1)
        add_lora(model, LoraSpec(rank=2, alpha=2.0))
        model.enable_gradient_checkpointing(True, offload=offload)
        x, t, c = _inputs(frames=2)
        model(x, t, c).square().mean().backward()
        grads[offload] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert (len(packed) > 0) == offload  # the offload path was taken only when asked for
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for k, v in grads[False].items():
        assert torch.equal(grads[True][k], v), k


def test_trainable_parameter_count_of_lora_matches_r_times_in_plus_out():
    # scripts/lora_memory.py's arithmetic against the LoRA count written out: every targeted linear
    # (q, k, v, o of both attentions and the two FFN linears, in every block) adds r (in + out).
    from scripts.lora_memory import trainable

    dim, ffn, layers, r = TINY.dim, TINY.ffn_dim, TINY.num_layers, 4
    per_block = 8 * r * (dim + dim) + r * (dim + ffn) + r * (ffn + dim)
    assert trainable("tiny", r, ("q", "k", "v", "o", "ffn.0", "ffn.2")) == (layers * per_block,) * 2
    full = sum(p.numel() for p in WanModel(TINY).parameters())
    assert trainable("tiny", None, ()) == (full, full)
