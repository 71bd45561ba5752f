"""The block-causal generator: masks element by element, cached inference vs the training path."""

from __future__ import annotations

import pytest
import torch

from tests.wan_helpers import randomize_
from wan import CausalWanModel, CrossAttentionCache, KVCache, WanConfig
from wan.attention import attention
from wan.masks import block_causal_frame_mask, chunked_mask, dense_token_mask, teacher_forcing_frame_mask

TINY = WanConfig.preset("tiny")


# ----------------------------------------------------------------------------------------------
# Mask rules, written out at token level from the spec (§2.2), independent of wan/masks.py
# ----------------------------------------------------------------------------------------------
def _token_end(q: torch.Tensor, tpf: int, n: int, independent_first_frame: bool) -> torch.Tensor:
    bk = n * tpf
    if not independent_first_frame:
        return (q // bk + 1) * bk
    return torch.where(q < tpf, torch.full_like(q, tpf), tpf + ((q - tpf) // bk + 1) * bk)


def reference_causal_mask(frames, tpf, n, independent_first_frame=False, local=-1, sink=0):
    total = frames * tpf
    q = torch.arange(total)[:, None]
    kv = torch.arange(total)[None, :]
    end = _token_end(q, tpf, n, independent_first_frame)
    allowed = kv < end
    if local != -1:
        allowed &= (kv >= end - (local - sink) * tpf) | (kv < sink * tpf)
    return allowed | (q == kv)


def reference_teacher_forcing_mask(frames, tpf, n):
    total = frames * tpf
    bk = n * tpf
    q = torch.arange(2 * total)[:, None]
    kv = torch.arange(2 * total)[None, :]
    clean_q, clean_kv = q < total, kv < total
    # clean queries: block-causal among clean tokens
    clean_rule = clean_q & clean_kv & (kv < (q // bk + 1) * bk)
    # noisy query in chunk b: noisy keys of chunk b, clean keys of chunks < b
    b = (q - total) // bk
    noisy_rule = (~clean_q) & (((~clean_kv) & ((kv - total) // bk == b)) | (clean_kv & (kv < b * bk)))
    return clean_rule | noisy_rule | (q == kv)


@pytest.mark.parametrize(
    "frames, n, iff", [(6, 3, False), (6, 2, False), (7, 3, True), (5, 1, False), (4, 4, False)]
)
@pytest.mark.parametrize("tpf", [1, 3])
def test_block_causal_mask_matches_rule(frames, n, iff, tpf):
    ours = dense_token_mask(block_causal_frame_mask(frames, n, iff), tpf, torch.device("cpu"))
    assert torch.equal(ours, reference_causal_mask(frames, tpf, n, iff))


@pytest.mark.parametrize("frames, n, local, sink", [(9, 3, 4, 0), (9, 3, 6, 0), (9, 1, 3, 1), (12, 3, 5, 2)])
def test_local_window_mask_matches_rule(frames, n, local, sink):
    ours = dense_token_mask(block_causal_frame_mask(frames, n, False, local, sink), 2, torch.device("cpu"))
    assert torch.equal(ours, reference_causal_mask(frames, 2, n, False, local, sink))


@pytest.mark.parametrize("frames, n", [(6, 3), (6, 2), (3, 1)])
def test_teacher_forcing_mask_matches_rule(frames, n):
    ours = dense_token_mask(teacher_forcing_frame_mask(frames, n), 2, torch.device("cpu"))
    assert torch.equal(ours, reference_teacher_forcing_mask(frames, 2, n))


CHUNKED_CASES = [
    ("causal", (6, 3, False, -1, 0)),
    ("causal", (7, 3, True, -1, 0)),
    ("causal", (5, 1, False, -1, 0)),
    ("causal", (9, 3, False, 6, 0)),
    ("causal", (12, 3, False, 5, 2)),  # sink + window: two key runs per chunk
    ("teacher_forcing", (6, 2)),  # clean context + own noisy chunk: two key runs
]


@pytest.mark.parametrize("kind, args", CHUNKED_CASES)
def test_chunked_attention_equals_dense_masked_sdpa(kind, args):
    # Block-sparse attention (one unmasked SDPA per chunk) against SDPA with the token-level reference
    # mask, forward and backward.
    tpf = 3
    if kind == "causal":
        frames, n, iff, local, sink = args
        chunks = chunked_mask(block_causal_frame_mask(frames, n, iff, local, sink), tpf)
        ref_mask = reference_causal_mask(frames, tpf, n, iff, local, sink)
    else:
        frames, n = args
        chunks = chunked_mask(teacher_forcing_frame_mask(frames, n), tpf)
        ref_mask = reference_teacher_forcing_mask(frames, tpf, n)
    g = torch.Generator().manual_seed(0)
    length = ref_mask.shape[0]
    q, k, v = (torch.randn(2, length, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    w = torch.randn(2, length, 2, 8, generator=g)
    ours = attention(q, k, v, chunks)
    grads = torch.autograd.grad((ours * w).sum(), (q, k, v))
    tr = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    ref = torch.nn.functional.scaled_dot_product_attention(*tr, attn_mask=ref_mask).transpose(1, 2)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    assert torch.allclose(ours, ref, atol=1e-6)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    # every query is covered once, in order
    starts = [c[0].start for c in chunks.chunks]
    assert starts[0] == 0 and chunks.chunks[-1][0].stop == length and starts == sorted(set(starts))


def test_frames_not_splitting_into_blocks_is_a_clear_error():
    with pytest.raises(ValueError, match="num_frame_per_block=3"):
        block_causal_frame_mask(7, 3)


# ----------------------------------------------------------------------------------------------
# Cached inference == training path
# ----------------------------------------------------------------------------------------------
def _model(seed=0, **kw) -> CausalWanModel:
    return randomize_(CausalWanModel(TINY, **kw).eval(), seed=seed)


def _inputs(b, f, hw=(4, 6), text=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, TINY.in_dim, f, *hw, generator=g)
    t = torch.rand(b, f, generator=g) * 1000
    c = torch.randn(b, text, TINY.text_dim, generator=g)
    return x, t, c


def _cached_rollout(model, x, t, c, sizes, max_frames=None):
    b, _, f, h, w = x.shape
    kv = KVCache.for_model(model, b, (h, w), max_frames or f)
    xc = CrossAttentionCache.for_model(model)
    outs, start = [], 0
    for n in sizes:
        outs.append(
            model(
                x[:, :, start : start + n],
                t[:, start : start + n],
                c,
                kv_cache=kv,
                crossattn_cache=xc,
                current_start_frame=start,
            )
        )
        start += n
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize(
    "frames, n, iff, batch",
    [(6, 3, False, 2), (6, 2, False, 1), (7, 3, True, 2), (4, 1, False, 1), (5, 1, True, 1)],
)
def test_cached_inference_equals_training_path(frames, n, iff, batch):
    model = _model(num_frame_per_block=n, independent_first_frame=iff)
    x, t, c = _inputs(batch, frames)
    sizes = ([1] if iff else []) + [n] * ((frames - (1 if iff else 0)) // n)
    with torch.no_grad():
        full = model(x, t, c)
        cached = _cached_rollout(model, x, t, c, sizes)
    assert (full - cached).abs().max() <= 1e-5 * max(1.0, full.abs().max().item())


@pytest.mark.parametrize("frames, n, local, sink", [(9, 3, 6, 0), (10, 2, 4, 0), (9, 3, 5, 2), (8, 1, 3, 1)])
def test_rolling_window_cache_equals_windowed_training_path(frames, n, local, sink):
    model = _model(num_frame_per_block=n, local_attn_size=local, sink_size=sink)
    x, t, c = _inputs(1, frames)
    with torch.no_grad():
        full = model(x, t, c)
        cached = _cached_rollout(model, x, t, c, [n] * (frames // n))
    assert (full - cached).abs().max() <= 1e-5 * max(1.0, full.abs().max().item())


def test_rerunning_a_block_overwrites_its_slots():
    # Denoising steps re-run the same block; only the last run may stay in the cache.
    model = _model(num_frame_per_block=2)
    x, t, c = _inputs(1, 4)
    kv = KVCache.for_model(model, 1, (4, 6), 4)
    with torch.no_grad():
        model(
            torch.randn_like(x[:, :, :2]), t[:, :2] * 0.5, c, kv_cache=kv, current_start_frame=0
        )  # stale step
        model(x[:, :, :2], t[:, :2], c, kv_cache=kv, current_start_frame=0)
        second = model(x[:, :, 2:], t[:, 2:], c, kv_cache=kv, current_start_frame=2)
        full = model(x, t, c)
    assert torch.allclose(second, full[:, :, 2:], atol=1e-5)


def test_teacher_forcing_equals_cache_of_clean_context():
    # Teacher forcing emulates: noisy block b attends to the clean blocks before it, as a KV cache
    # filled with the clean frames (at aug_t) would provide.
    n, frames = 2, 6
    model = _model(num_frame_per_block=n)
    x, t, c = _inputs(2, frames, seed=1)
    clean, _, _ = _inputs(2, frames, seed=2)
    aug_t = torch.full((2, frames), 40.0)
    with torch.no_grad():
        tf = model(x, t, c, clean_x=clean, aug_t=aug_t)
        kv = KVCache.for_model(model, 2, (4, 6), frames)
        outs = []
        for s in range(0, frames, n):
            outs.append(model(x[:, :, s : s + n], t[:, s : s + n], c, kv_cache=kv, current_start_frame=s))
            model(clean[:, :, s : s + n], aug_t[:, s : s + n], c, kv_cache=kv, current_start_frame=s)
    assert (tf - torch.cat(outs, 2)).abs().max() <= 1e-5 * max(1.0, tf.abs().max().item())


def test_flex_and_sdpa_paths_agree():
    # Flex attention runs (forward only, unfused) on CPU: compare it with the dense-mask SDPA path,
    # at a token count that is a multiple of 128 (upstream crashes there) and one that is not.
    for hw, frames in (((16, 16), 2), ((4, 6), 6)):
        flex = _model(num_frame_per_block=2, local_attn_size=4, attn_backend="flex")
        sdpa = CausalWanModel(TINY, num_frame_per_block=2, local_attn_size=4, attn_backend="sdpa").eval()
        sdpa.load_state_dict(flex.state_dict())
        x, t, c = _inputs(1, frames, hw=hw)
        clean, _, _ = _inputs(1, frames, hw=hw, seed=3)
        with torch.no_grad():
            assert torch.allclose(flex(x, t, c), sdpa(x, t, c), atol=1e-5)
            assert torch.allclose(flex(x, t, c, clean_x=clean), sdpa(x, t, c, clean_x=clean), atol=1e-5)


def test_mask_is_rebuilt_when_the_shape_changes():
    model = _model(num_frame_per_block=2)
    fresh = CausalWanModel(TINY, num_frame_per_block=2).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        model(*_inputs(1, 4))  # builds the 4-frame mask first
        x, t, c = _inputs(1, 6)
        assert torch.equal(model(x, t, c), fresh(x, t, c))


def test_running_past_the_cache_without_window_is_a_clear_error():
    model = _model(num_frame_per_block=2)
    x, t, c = _inputs(1, 6)
    with torch.no_grad(), pytest.raises(ValueError, match="max_frames=4"):
        _cached_rollout(model, x, t, c, [2, 2, 2], max_frames=4)


def test_long_generation_with_rolling_window_runs_past_training_length():
    model = _model(num_frame_per_block=2, local_attn_size=4, sink_size=1)
    x, t, c = _inputs(1, 20)
    with torch.no_grad():
        out = _cached_rollout(model, x, t, c, [2] * 10, max_frames=6)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_crossattention_cache_is_reused():
    model = _model(num_frame_per_block=2)
    x, t, c = _inputs(1, 4)
    kv = KVCache.for_model(model, 1, (4, 6), 4)
    xc = CrossAttentionCache.for_model(model)
    with torch.no_grad():
        model(x[:, :, :2], t[:, :2], c, kv_cache=kv, crossattn_cache=xc)
        assert xc.is_init
        a = model(x[:, :, 2:], t[:, 2:], c, kv_cache=kv, crossattn_cache=xc, current_start_frame=2)
        kv.reset()
        model(x[:, :, :2], t[:, :2], c, kv_cache=kv, crossattn_cache=xc)
        # a different context is ignored while the cross-attention cache holds the first one
        b = model(
            x[:, :, 2:], t[:, 2:], torch.zeros_like(c), kv_cache=kv, crossattn_cache=xc, current_start_frame=2
        )
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Differentiable cached calls (Self-Forcing's exit step)
# ----------------------------------------------------------------------------------------------
def _grad_rollout(model, x, t, c, n, exit_block_grad=True):
    """Fill the cache block by block; the last block is evaluated with grad; returns its output."""
    kv = KVCache.for_model(model, x.shape[0], x.shape[-2:], x.shape[2])
    xc = CrossAttentionCache.for_model(model)
    f = x.shape[2]
    with torch.no_grad():
        for s in range(0, f - n, n):
            model(
                x[:, :, s : s + n], t[:, s : s + n], c, kv_cache=kv, crossattn_cache=xc, current_start_frame=s
            )
    s = f - n
    before = [layer.k.clone() for layer in kv.layers]
    with torch.set_grad_enabled(exit_block_grad):
        out = model(x[:, :, s:], t[:, s:], c, kv_cache=kv, crossattn_cache=xc, current_start_frame=s)
    return out, kv, before


@pytest.mark.parametrize("checkpointing", [False, True])
def test_grad_call_matches_no_grad_and_never_writes(checkpointing):
    model = _model(num_frame_per_block=2)
    model.enable_gradient_checkpointing(checkpointing)
    x, t, c = _inputs(1, 6)
    out, kv, before = _grad_rollout(model, x, t, c, 2)
    assert out.requires_grad
    for layer, k0 in zip(kv.layers, before, strict=True):
        assert torch.equal(layer.k, k0) and not layer.k.requires_grad
    with torch.no_grad():
        assert torch.allclose(out, model(x, t, c)[:, :, 4:], atol=1e-5)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = _model(num_frame_per_block=2)
        model.enable_gradient_checkpointing(ckpt)
        x, t, c = _inputs(1, 6)
        out, _, _ = _grad_rollout(model, x, t, c, 2)
        out.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_rolling_window_grad_call_reads_the_right_context():
    model = _model(num_frame_per_block=2, local_attn_size=4, sink_size=1)
    model.enable_gradient_checkpointing(True)
    x, t, c = _inputs(1, 8)
    out, _, _ = _grad_rollout(model, x, t, c, 2)
    with torch.no_grad():
        full = model(x, t, c)
    assert torch.allclose(out, full[:, :, 6:], atol=1e-5)
    out.sum().backward()
