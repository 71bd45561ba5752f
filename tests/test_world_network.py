"""The world preset's network options (absolute positions, RoPE base, adaLN-Zero gates, prompt in adaLN, x0 head):
Wan2.1 presets are untouched, the causal paths still agree, and the position rule holds element by element."""

import math

import pytest
import torch

from wan import CausalWanModel, KVCache, WanConfig, WanModel
from wan.cache import CrossAttentionCache
from wan.modules import rope_angles
from world.network import NETWORK

from .wan_helpers import randomize_

WORLD = NETWORK


def test_wan_presets_have_no_world_options():
    for name in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "tiny"):
        cfg = WanConfig.preset(name)
        assert cfg.pos_embed_frames == 0 and cfg.rope_theta == 10000.0 and not cfg.zero_init_gates
        assert not any("pos_embedding" in k for k in WanModel(WanConfig.preset("tiny")).state_dict())


def test_rope_theta_sets_the_angle_base():
    cfg = WORLD
    angles = rope_angles(cfg, 3, 2, 2, start_frame=5, device="cpu")  # [12, head_dim/2]
    dt = cfg.rope_dims[0]
    # token (frame 1, row 0, col 0) is index 4; its time angles are (5 + 1) * theta^(-2i/dt)
    expected = [(5 + 1) * cfg.rope_theta ** (-2 * i / dt) for i in range(dt // 2)]
    assert torch.allclose(angles[4, : dt // 2], torch.tensor(expected, dtype=torch.float64))


def test_learned_position_embedding_rule():
    model = randomize_(WanModel(WORLD.replace(pos_embed_type="learned")))
    pe = model.pos_embedding
    emb = pe((6, 4, 4), start_frame=1)
    for f in range(6):
        row = min(f + 1, WORLD.pos_embed_frames - 1)
        for h in range(4):
            for w in range(4):
                want = pe.frame[row] + pe.height[h] + pe.width[w]
                assert torch.equal(emb[(f * 4 + h) * 4 + w], want)
    with pytest.raises(ValueError, match="token grid"):
        pe((1, 2, 4), 0)


def test_zero_init_gates_make_every_block_the_identity():
    model = WanModel(WORLD)  # fresh init, not randomised
    e0 = model.embed_time(torch.tensor([[300.0], [900.0]]), torch.randn(2, WORLD.text_len, WORLD.text_dim))[1]
    text = torch.randn(2, WORLD.text_len, WORLD.dim)
    from wan.modules import Rope

    rope = Rope.for_grid(WORLD, (4, 4, 4), 0, "cpu", torch.float32)
    x = torch.randn(2, 64, WORLD.dim)
    block = model.blocks[0]
    # the cross-attention has no gate (spec §1.3): identity up to that residual only
    with torch.no_grad():
        cross = block.cross_attn(block.norm3(x), block.cross_attn.text_kv(text))
        assert torch.allclose(block(x, e0, text, rope), x + cross, atol=1e-6)
    assert all(
        float(b.self_attn.norm_q.weight.detach().mean()) == WORLD.qk_norm_init for b in model.blocks
    ) and math.isclose(WORLD.qk_norm_init, 2.0)


def _cache_equals_training_path(cfg: WanConfig, local: int, sink: int, seed: int) -> None:
    """Block by block through the KV/cross-attention caches == one block-masked training-path call."""
    model = randomize_(CausalWanModel(cfg, num_frame_per_block=3, local_attn_size=local, sink_size=sink))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 48, 12, 4, 4, generator=g)
    t = torch.rand(2, 12, generator=g) * 1000
    c = torch.randn(2, 6, cfg.text_dim, generator=g)
    kv = KVCache.for_model(model, 2, (4, 4), 12)
    xc = CrossAttentionCache.for_model(model)
    with torch.no_grad():
        full = model(x, t, c)
        blocks = [
            model(
                x[:, :, s : s + 3], t[:, s : s + 3], c, kv_cache=kv, crossattn_cache=xc, current_start_frame=s
            )
            for s in range(0, 12, 3)
        ]
    assert (full - torch.cat(blocks, dim=2)).abs().max() <= 1e-5 * max(1.0, full.abs().max().item())


@pytest.mark.parametrize("local, sink", [(-1, 0), (6, 3)])
def test_world_causal_cache_equals_training_path(local, sink):
    _cache_equals_training_path(WORLD, local, sink, seed=0)


def test_world_rollout_runs_past_the_position_table():
    model = randomize_(CausalWanModel(WORLD, num_frame_per_block=3, local_attn_size=6, sink_size=3))
    kv = KVCache.for_model(model, 1, (4, 4), 6)
    xc = CrossAttentionCache.for_model(model)
    c = torch.randn(1, 6, WORLD.text_dim)
    with torch.no_grad():
        outs = [
            model(torch.randn(1, 48, 3, 4, 4), torch.full((1, 3), 500.0), c, kv_cache=kv, crossattn_cache=xc,
                  current_start_frame=s)
            for s in range(0, 36, 3)
        ]  # fmt: skip
    assert all(torch.isfinite(o).all() for o in outs)


SINCOS = WORLD.replace(pos_embed_type="sincos")


def test_sincos_positions_are_fixed_features_of_one_axis_each():
    model = WanModel(SINCOS)
    assert not any("pos_embedding" in k for k in model.state_dict())  # a function of the config, no weights
    n_frames = SINCOS.pos_embed_frames
    emb = model.pos_embedding((n_frames + 3, 4, 4), start_frame=0).view(n_frames + 3, 4, 4, -1).double()
    # every token's features are sin/cos pairs: squared norm dim / 2, whatever the position
    assert torch.allclose(emb.pow(2).sum(-1), torch.full(emb.shape[:3], SINCOS.dim / 2, dtype=torch.float64))
    # frames past the table repeat its last row (the clamp)
    assert torch.equal(emb[n_frames:], emb[n_frames - 1 : n_frames].expand(3, -1, -1, -1))
    emb = emb[:n_frames]
    # each channel follows exactly one axis (frame, row or column); together they cover every channel
    moves = [(emb - emb.mean(dim=axis, keepdim=True)).abs().amax(dim=(0, 1, 2)) > 1e-9 for axis in range(3)]
    assert torch.equal(
        moves[0].int() + moves[1].int() + moves[2].int(), torch.ones(SINCOS.dim, dtype=torch.int)
    )
    for axis, n in zip(range(3), (n_frames, 4, 4), strict=True):
        channels = moves[axis].nonzero().flatten()
        feats = emb.movedim(axis, 0)[:, 0, 0, channels]  # [n, d_axis] along this axis
        half = len(channels) // 2
        periods = [3.0 * (4.0 * n / 3.0) ** (i / (half - 1)) for i in range(half)]  # geometric from 3 to 4n
        for p in range(n):
            want = [math.sin(2 * math.pi * p / T) for T in periods] + [
                math.cos(2 * math.pi * p / T) for T in periods
            ]
            assert torch.allclose(feats[p], torch.tensor(want, dtype=torch.float64), atol=1e-6)
    # every (frame, row, column) in the table has its own embedding
    flat = emb.reshape(-1, SINCOS.dim)
    assert torch.cdist(flat, flat).add(torch.eye(len(flat), dtype=torch.float64)).min() > 0.1


def test_extrapolated_sincos_frames_past_the_table_get_their_own_formula_rows():
    n = SINCOS.pos_embed_frames
    clamped = WanModel(SINCOS).pos_embedding((n + 4, 4, 4), start_frame=0).view(n + 4, 16, -1).double()
    model = WanModel(SINCOS.replace(pos_embed_extrapolate=True))
    assert not any("pos_embedding" in k for k in model.state_dict())  # checkpoints load either way
    emb = model.pos_embedding((n + 4, 4, 4), start_frame=0).view(n + 4, 16, -1).double()
    assert torch.equal(emb[:n], clamped[:n])  # the table's own rows are unchanged
    # frame channels: those that move along the frame axis within the table
    channels = ((clamped[:n] - clamped[:n].mean(0)).abs().amax(dim=(0, 1)) > 1e-9).nonzero().flatten()
    half = len(channels) // 2
    periods = [3.0 * (4.0 * n / 3.0) ** (i / (half - 1)) for i in range(half)]  # still fixed by the table (n)
    for f in range(n, n + 4):
        want = [math.sin(2 * math.pi * f / T) for T in periods] + [
            math.cos(2 * math.pi * f / T) for T in periods
        ]
        assert torch.allclose(emb[f, 0, channels], torch.tensor(want, dtype=torch.float64), atol=1e-6)
        # row/column channels are the same as in every other frame; frames stay apart
        others = torch.ones(emb.shape[-1], dtype=torch.bool)
        others[channels] = False
        assert torch.equal(emb[f][:, others], emb[0][:, others])
        assert (emb[f] - emb[f - 1]).abs().max() > 0.1
    # the same rows whatever the call's first frame (the cached rollout asks block by block)
    assert torch.equal(model.pos_embedding((3, 4, 4), start_frame=n).view(3, 16, -1).double(), emb[n : n + 3])
    with pytest.raises(ValueError, match="pos_embed_extrapolate needs pos_embed_type='sincos'"):
        SINCOS.replace(pos_embed_type="learned", pos_embed_extrapolate=True)


def test_text_time_embedding_adds_the_pooled_prompt_to_the_time_embedding():
    cfg = SINCOS.replace(text_time_embedding=True)
    for name in ("wan2.1-t2v-1.3b", "tiny"):
        assert not WanConfig.preset(name).text_time_embedding
    model = WanModel(cfg)
    t = torch.tensor([[300.0], [900.0]])
    context = torch.randn(2, 6, cfg.text_dim)
    e_init = model.embed_time(t, context)[0]
    # a fresh network starts from the time embedding alone (the prompt's layer starts at zero)
    half = cfg.freq_dim // 2  # Wan's time embedding: [cos(t w_i), sin(t w_i)], w_i = 10000^(-i/half)
    angles = t.double() * torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)
    sinusoid = torch.cat([angles.cos(), angles.sin()], dim=-1).float()
    assert torch.allclose(e_init, model.time_embedding(sinusoid)[:, None], atol=1e-5)
    randomize_(model)
    e, e0 = model.embed_time(t, context)
    w1, w2 = model.text_time_embedding[0], model.text_time_embedding[2]
    pooled = context.sum(1) / cfg.text_len  # zero padding to text_len rows changes nothing
    prompt = torch.nn.functional.linear(
        torch.nn.functional.silu(torch.nn.functional.linear(pooled, w1.weight, w1.bias)), w2.weight, w2.bias
    )
    assert torch.allclose(e, (model.time_embedding(sinusoid) + prompt)[:, None], atol=1e-5)
    padded = torch.cat([context, torch.zeros(2, cfg.text_len - 6, cfg.text_dim)], dim=1)
    assert torch.equal(model.embed_time(t, padded)[1], e0)
    # the prompt now reaches every block's modulation
    assert not torch.allclose(model.embed_time(t, context.flip(0))[1], e0)
    with pytest.raises(ValueError, match="text context"):
        model.embed_time(t)


@pytest.mark.parametrize("local, sink", [(-1, 0), (6, 3)])
def test_sincos_text_time_x0_causal_cache_equals_training_path(local, sink):
    _cache_equals_training_path(
        SINCOS.replace(text_time_embedding=True, predict_x0=True), local, sink, seed=1
    )


def test_predict_x0_returns_the_flow_whose_x0_is_the_head_output():
    from utils.scheduler import FlowMatchScheduler
    from wan import WanDiffusionWrapper

    plain = randomize_(WanModel(SINCOS.replace(predict_x0=False)))
    x0_net = WanModel(SINCOS.replace(predict_x0=True))
    x0_net.load_state_dict(plain.state_dict())  # the same weights: the head's output is the same tensor
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 48, 6, 4, 4, generator=g)
    t = torch.tensor([[1000.0, 800.0, 500.0, 200.0, 20.0, 0.0], [999.0, 1.0, 0.5, 300.0, 700.0, 900.0]])
    c = torch.randn(2, 6, SINCOS.text_dim, generator=g)
    with torch.no_grad():
        head = plain(x, t, c)  # without predict_x0 the head's output is returned as it is
        flow = x0_net(x, t, c)
        sigma = (t / 1000).clamp(min=1e-3)[:, None, :, None, None]
        assert torch.allclose(flow, (x - head) / sigma, rtol=1e-5, atol=1e-4)
        # seen through the wrapper (x0 = x - sigma v with the exact sigma), x0 is the head's output
        _, x0 = WanDiffusionWrapper(x0_net, FlowMatchScheduler(shift=5.0))(x.transpose(1, 2), t, c)
        above_floor = (t >= 1.0)[:, :, None, None, None]
        diff = (x0 - head.transpose(1, 2)).abs() * above_floor
        assert diff.max() < 1e-4


def test_sincos_tables_are_rebuilt_after_a_meta_build():
    with torch.device("meta"):
        model = WanModel(SINCOS)
    model.to_empty(device="cpu")
    model.pos_embedding.init_non_persistent_buffers()
    reference = WanModel(SINCOS).pos_embedding
    for name in ("frame", "height", "width"):
        assert torch.equal(getattr(model.pos_embedding, name), getattr(reference, name))


def test_without_frame_rows_the_position_embedding_is_the_same_in_every_frame():
    for kind in ("sincos", "learned"):
        cfg = WORLD.replace(pos_embed_type=kind, pos_embed_frame_rows=False)
        model = randomize_(WanModel(cfg))
        pe = model.pos_embedding
        assert not hasattr(pe, "frame") or kind == "sincos"  # a learned table has no untrainable rows
        emb = pe((5, 4, 4), start_frame=30).view(5, 4, 4, -1)
        for h in range(4):
            for w in range(4):
                assert torch.equal(emb[:, h, w], (pe.height[h] + pe.width[w]).expand(5, -1))


def _periodic_rollout(cfg: WanConfig) -> list[torch.Tensor]:
    """Outputs of a 36-frame cached rollout in a window of 6 frames without a sink whose blocks' inputs
    alternate a, b, a, b, ...: block k (k >= 2) sees inputs a, b, a through its two layers' windows, the
    same at every even k but at frame positions 6 apart."""
    model = randomize_(CausalWanModel(cfg, num_frame_per_block=3, local_attn_size=6, sink_size=0), seed=1)
    kv = KVCache.for_model(model, 1, (4, 4), 6)
    xc = CrossAttentionCache.for_model(model)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, 48, 3, 4, 4, generator=g) for _ in range(2)]
    c = torch.randn(1, 6, cfg.text_dim, generator=g)
    with torch.no_grad():
        return [
            model(inputs[k % 2], torch.full((1, 3), 500.0), c, kv_cache=kv, crossattn_cache=xc,
                  current_start_frame=3 * k)
            for k in range(12)
        ]  # fmt: skip


def test_without_frame_rows_a_rolling_window_sees_only_frame_offsets():
    """RoPE alone: a block's output depends on its window's contents and their offsets, not on how far
    into the rollout it is; with absolute frame rows (extrapolated past the table) it does."""
    relative = _periodic_rollout(WORLD.replace(pos_embed_frame_rows=False))
    for k in (4, 6, 10):
        torch.testing.assert_close(relative[k], relative[2], rtol=0, atol=1e-4)
    absolute = _periodic_rollout(WORLD.replace(pos_embed_extrapolate=True))
    assert (absolute[10] - absolute[2]).abs().max() > 1e-2
