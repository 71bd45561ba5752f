"""torchrun worker for tests/test_sequence_parallel.py: `sequence_parallel_checks.py OUT_DIR` (2 ranks, gloo).

Every check runs a network with sequence parallelism over both ranks (sp = 2) and the same network
without it on each rank (the one-process code path, which knows nothing of the group), on the same
inputs, and compares:

* outputs: equal to float32 round-off, and bitwise the same on both ranks (they are gathered);
* gradients: the ranks of a group compute the same loss, and autograd across the group differentiates
  the sum of their losses, so the SUM over ranks of any leaf's gradient must equal sp x the one-process
  gradient (`assert_group_grads`); FSDP's mean over ranks then gives the one-process gradient
  (`dmd_step_fsdp`).

The video is 9 tokens per frame (6x6 latents, patch 2x2), which does not split over 2 ranks: rank 0
holds 5 tokens of each frame, rank 1 holds 4 and a padding token.
"""

from __future__ import annotations

import copy
import sys
import time

import torch
import torch.distributed as dist

from model.build import build_objective_from_config
from pipeline import CausalInferencePipeline, SelfForcingTrainingPipeline
from tests.dist_helpers import CheckRecorder
from tests.wan_helpers import randomize_
from utils.config import load_config
from utils.distributed import build_mesh, cleanup, init_distributed, load_full_state_dict, shard_model
from utils.scheduler import FlowMatchScheduler
from utils.sequence_parallel import ParallelDims, init_sequence_parallel
from wan import CausalWanModel, KVCache, WanConfig, WanDiffusionWrapper, WanModel
from wan.gan_head import add_gan_head, gan_logits
from wan.sequence_parallel import TokenShards

TINY = WanConfig.preset("tiny")
HW = (6, 6)  # 3x3 = 9 tokens per frame
TPF = 9
SP = 2
RTOL, ATOL = 1e-5, 1e-6
STEPS = FlowMatchScheduler(shift=5.0).warp([1000, 750, 500, 250])


WORST = {"rel": 0.0}  # largest |difference| / max|expected| of the running check (printed)


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")
    rel = (actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)
    WORST["rel"] = max(WORST["rel"], float(rel))


def same_on_every_rank(x: torch.Tensor, what: str) -> None:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    assert all(torch.equal(p, parts[0]) for p in parts), f"{what} differs between the ranks"


def inputs(frames: int, seed: int = 0, batch: int = 2, text_len: int = 7):
    """Latents `[B, F, C, H, W]` and text `[B, L, text_dim]`, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, TINY.in_dim, *HW, generator=g)
    return x, torch.randn(batch, text_len, TINY.text_dim, generator=g)


def pair(make, dims: ParallelDims, seed: int = 0):
    """(sequence-parallel network, one-process network) with the same random weights."""
    ref = randomize_(make(), seed=seed)
    sp = copy.deepcopy(ref)
    getattr(sp, "model", sp).enable_sequence_parallel(dims.comm)  # the DiT, bare or wrapped
    return sp, ref


def assert_group_grads(sp_params, ref_params, what: str) -> None:
    """sum over the group of each gradient == sp x the one-process gradient (see the module docstring)."""
    sp_params, ref_params = list(sp_params), list(ref_params)
    assert len(sp_params) == len(ref_params) and sp_params
    compared = 0
    for (name, p), (_, q) in zip(sp_params, ref_params, strict=True):
        if q.grad is None:  # unused here (e.g. the DiT's output head under the GAN head)
            assert p.grad is None, f"{what}: {name} has a gradient only with sequence parallelism"
            continue
        g = p.grad.clone() if p.grad is not None else torch.zeros_like(q.grad)
        dist.all_reduce(g)
        close(g / SP, q.grad, f"{what}: gradient of {name}")
        compared += 1
    assert compared > len(sp_params) // 2, f"{what}: only {compared} gradients compared"


def wrap(model) -> WanDiffusionWrapper:
    return WanDiffusionWrapper(model, FlowMatchScheduler(shift=5.0))


# ------------------------------------------------------------------------------------------------ checks
def check_layout(dims: ParallelDims) -> None:
    """shard / gather / to_heads / to_tokens against the layout rule written out element by element."""
    frames, b, c = 3, 2, 5
    shards = TokenShards(dims.comm, frames, TPF)
    tp = shards.local_tokens_per_frame
    assert tp == 5
    tokens = torch.arange(b * frames * TPF * c, dtype=torch.float32).view(b, frames * TPF, c)
    local = shards.shard(tokens)
    assert local.shape == (b, frames * tp, c)
    r = dims.sp_rank
    for f in range(frames):
        for j in range(tp):
            src = r * tp + j  # token j of this rank's part of frame f
            want = tokens[:, f * TPF + src] if src < TPF else torch.zeros(b, c)
            assert torch.equal(local[:, f * tp + j], want), (f, j)
    assert torch.equal(shards.gather(local), tokens)
    h, d = 4, 3
    qkv = [torch.randn(b, frames * TPF, h, d, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    heads = shards.to_heads(*(shards.shard(x.flatten(2)).unflatten(-1, (h, d)) for x in qkv))
    mine = slice(r * h // SP, (r + 1) * h // SP)
    for got, x in zip(heads, qkv, strict=True):
        assert torch.equal(got, x[:, :, mine]), "to_heads: whole sequence of this rank's heads"
    back = shards.to_tokens(heads[0])
    assert torch.equal(back, shards.shard(qkv[0].flatten(2)).unflatten(-1, (h, d))), "to_tokens"


def check_bidirectional(dims: ParallelDims) -> None:
    """WanModel (teacher/critic): forward with [B] and [B, F] timesteps, hidden states, backward."""
    sp, ref = pair(lambda: WanModel(TINY), dims)
    x, ctx = inputs(3)
    x = x.transpose(1, 2)  # the DiT's own layout [B, C, F, H, W]
    for t in (torch.tensor([300.0, 700.0]), torch.tensor([[100.0, 500.0, 900.0], [0.0, 250.0, 999.0]])):
        xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_sp, hid_sp = sp(xs, t, ctx, hidden_states_at=(0, 1))
        out_ref, hid_ref = ref(xr, t, ctx, hidden_states_at=(0, 1))
        same_on_every_rank(out_sp, "output")
        close(out_sp, out_ref, "bidirectional output")
        for a, b_ in zip(hid_sp, hid_ref, strict=True):
            close(a, b_, "hidden states")
        sp.zero_grad(), ref.zero_grad()
        (out_sp.square().mean() + hid_sp[0].sin().mean()).backward()
        (out_ref.square().mean() + hid_ref[0].sin().mean()).backward()
        assert_group_grads(sp.named_parameters(), ref.named_parameters(), "bidirectional")
        assert_group_grads([("x", xs)], [("x", xr)], "bidirectional input")


def _train_path(dims: ParallelDims, frames: int, teacher_forcing: bool = False, **model_kw) -> None:
    sp, ref = pair(lambda: CausalWanModel(TINY, **model_kw), dims, seed=1)
    sp.enable_gradient_checkpointing(True)  # recomputation runs the all-to-alls again in backward
    x, ctx = inputs(frames, seed=2)
    x = x.transpose(1, 2)
    g = torch.Generator().manual_seed(3)
    t = torch.rand(2, frames, generator=g) * 1000
    kw = {}
    if teacher_forcing:
        kw = {"clean_x": torch.randn(x.shape, generator=g), "aug_t": torch.rand(2, frames, generator=g) * 100}
    outs = []
    for net in (sp, ref):
        net.zero_grad()
        y = net(x, t, ctx, **kw)
        y.square().mean().backward()
        outs.append(y)
    same_on_every_rank(outs[0], "output")
    close(outs[0], outs[1], f"causal training path {model_kw}")
    assert_group_grads(sp.named_parameters(), ref.named_parameters(), f"causal training path {model_kw}")


def check_causal_train(dims: ParallelDims) -> None:
    _train_path(dims, 6, num_frame_per_block=3)
    _train_path(dims, 7, num_frame_per_block=3, independent_first_frame=True)


def check_causal_train_window_sink(dims: ParallelDims) -> None:
    _train_path(dims, 9, num_frame_per_block=3, local_attn_size=5, sink_size=1)


def check_teacher_forcing(dims: ParallelDims) -> None:
    _train_path(dims, 6, teacher_forcing=True, num_frame_per_block=3)


def check_cached_rollout(dims: ParallelDims) -> None:
    """Block-by-block inference with the KV cache, 12 frames through a 7-frame window with a sink."""
    sp, ref = pair(
        lambda: wrap(CausalWanModel(TINY, num_frame_per_block=3, local_attn_size=7, sink_size=1)), dims
    )
    noise, ctx = inputs(12, seed=4)
    outs = []
    for net in (sp, ref):
        pipe = CausalInferencePipeline(net, FlowMatchScheduler(shift=5.0), STEPS, 3, context_noise=50.0)
        outs.append(
            pipe.inference(noise, {"prompt_embeds": ctx}, generator=torch.Generator().manual_seed(5)).latents
        )
    same_on_every_rank(outs[0], "rollout")
    close(outs[0], outs[1], "cached rollout")
    kv = KVCache.for_model(sp.model, 2, HW, 12)
    assert kv.num_heads == TINY.num_heads // SP, "each rank caches its heads of the whole sequence"
    wrong = KVCache.for_model(ref.model, 2, HW, 12)
    try:
        sp.model(noise[:, :3].transpose(1, 2), torch.zeros(2, 3), ctx, kv_cache=wrong, current_start_frame=0)
    except ValueError as err:
        assert "KV cache holds 2 heads" in str(err), err
    else:
        raise AssertionError("a KV cache with every head was accepted by a sequence-parallel model")


def check_rollout_grad(dims: ParallelDims) -> None:
    """The Self-Forcing training rollout (exit steps with grad, reading the cache) with a rolling window."""
    make = lambda: wrap(CausalWanModel(TINY, num_frame_per_block=3, local_attn_size=7, sink_size=1))  # noqa: E731
    sp, ref = pair(make, dims, seed=6)
    noise, ctx = inputs(12, seed=7)
    outs = []
    for net in (sp, ref):
        net.zero_grad()
        pipe = SelfForcingTrainingPipeline(
            net, FlowMatchScheduler(shift=5.0), STEPS, 3, num_max_frames=12, same_step_across_blocks=False
        )
        out = pipe.inference_with_trajectory(
            noise, {"prompt_embeds": ctx}, exit_steps=[3, 1, 2, 0], generator=torch.Generator().manual_seed(8)
        ).latents
        out.square().mean().backward()
        outs.append(out)
    same_on_every_rank(outs[0], "rollout")
    close(outs[0], outs[1], "training rollout")
    assert_group_grads(sp.named_parameters(), ref.named_parameters(), "training rollout")


def check_gan_head(dims: ParallelDims) -> None:
    """The GAN discriminator reads gathered hidden states of the sequence-parallel critic."""

    def make():
        return add_gan_head(wrap(WanModel(TINY)), num_class=1, concat_time_embeddings=True, tap_layers=(0, 1))

    sp, ref = pair(make, dims, seed=9)
    x, ctx = inputs(3, seed=10)
    t = torch.tensor([200.0, 800.0])
    logits = []
    for net in (sp, ref):
        net.zero_grad()
        y = gan_logits(net, x, t, ctx)
        torch.nn.functional.softplus(-y).mean().backward()
        logits.append(y)
    close(logits[0], logits[1], "GAN logits")
    assert_group_grads(sp.named_parameters(), ref.named_parameters(), "GAN head")


def check_dmd_step_fsdp(dims: ParallelDims, info) -> None:
    """One DMD generator step and one critic step on FSDP2-sharded networks with sp = 2 (dp = 1):
    FSDP's reduced gradients must equal the one-process gradients of the same step."""
    cfg = load_config("configs/tiny_dmd.yaml", ["image_or_video_shape=[2,6,4,6,6]"])
    mesh = build_mesh("full", info.world_size, info.world_size, device_type="cpu")
    refs = {
        "generator": randomize_(wrap(CausalWanModel(TINY, num_frame_per_block=3)), seed=11),
        "real": randomize_(wrap(WanModel(TINY)), seed=12),
        "critic": randomize_(wrap(WanModel(TINY)), seed=13),
    }
    sps = {}
    refs["real"].requires_grad_(False)
    for role, ref in refs.items():
        net = copy.deepcopy(ref)
        net.model.enable_gradient_checkpointing(True)
        full = copy.deepcopy(ref).state_dict() if info.rank == 0 else None
        shard_model(net, mesh, block_lists=("model.blocks",), mixed_precision=False)
        load_full_state_dict(net, full, device=torch.device("cpu"))
        net.model.enable_sequence_parallel(dims.comm)
        sps[role] = net
    objectives = [
        build_objective_from_config(cfg, n["generator"], n["real"], n["critic"], None, torch.float32)
        for n in (sps, refs)
    ]
    _, ctx = inputs(6, seed=14)
    batch = {"prompt_embeds": ctx, "negative_prompt_embeds": torch.zeros_like(ctx)}
    shared = {"num_blocks": 2, "exit_steps": [2, 2]}
    for role in ("generator", "critic"):
        losses = []
        for objective, nets in zip(objectives, (sps, refs), strict=True):
            for net in nets.values():
                net.zero_grad()
            torch.manual_seed(15)  # the objective's noise: the same draws in both runs
            fn = objective.generator_loss if role == "generator" else objective.critic_loss
            loss, _ = fn(batch, shared)
            loss.backward()
            losses.append(loss.detach())
        close(losses[0], losses[1], f"DMD {role} loss")
        module = "generator" if role == "generator" else "critic"
        for (name, p), (_, q) in zip(
            sps[module].named_parameters(), refs[module].named_parameters(), strict=True
        ):
            close(p.grad.full_tensor(), q.grad, f"DMD {role} step: gradient of {name}")


def check_activations_per_rank(dims: ParallelDims) -> None:
    """What each rank keeps for backward (scripts/activation_memory.py, real tensors, fp32): half of a
    block's per-token bytes plus one copy of self-attention's output (dim floats per token, kept in the
    head layout by attention and in the token layout by the output projection), the whole text K/V;
    and the shape-only count behind the README's table gives exactly the same bytes."""
    from scripts.activation_memory import ShapeComm, fit

    per_rank = fit(TINY, torch.float32, False, fake=False, comm=dims.comm)  # 24 tokens per frame: even
    whole = fit(TINY, torch.float32, False, fake=False)
    assert SP * per_rank["per_token_layer"] == whole["per_token_layer"] + 4 * TINY.dim, (per_rank, whole)
    assert per_rank["per_layer"] == whole["per_layer"] > 0, (per_rank, whole)
    assert fit(TINY, torch.float32, False, comm=ShapeComm(SP)) == per_rank
    assert fit(TINY, torch.float32, True, comm=ShapeComm(SP)) == fit(
        TINY, torch.float32, True, fake=False, comm=dims.comm
    )


def main() -> None:
    out_dir = sys.argv[1]
    info = init_distributed()
    torch.set_num_threads(1)
    dims = init_sequence_parallel(SP, info)
    recorder = CheckRecorder(out_dir, info.rank)
    checks = {
        "layout": check_layout,
        "bidirectional": check_bidirectional,
        "causal_train": check_causal_train,
        "causal_train_window_sink": check_causal_train_window_sink,
        "teacher_forcing": check_teacher_forcing,
        "cached_rollout": check_cached_rollout,
        "rollout_grad": check_rollout_grad,
        "gan_head": check_gan_head,
        "dmd_step_fsdp": lambda d: check_dmd_step_fsdp(d, info),
        "activations_per_rank": check_activations_per_rank,
    }
    only = set(sys.argv[2].split(",")) if len(sys.argv) > 2 else set(checks)
    for name, fn in checks.items():
        if name in only:
            started, WORST["rel"] = time.perf_counter(), 0.0
            recorder.run(name, lambda fn=fn: fn(dims))
            took = time.perf_counter() - started
            print(f"rank {info.rank}: {name} {took:.1f}s, worst relative difference {WORST['rel']:.1e}")
    recorder.write()
    cleanup()


if __name__ == "__main__":
    main()
