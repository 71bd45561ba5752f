"""The toy networks (the `tiny` preset's seeded frozen networks): deterministic across processes and usable on any prompt."""

import torch

from wan.toy import toy_text_encoder, toy_tokenizer, toy_vae


def test_toy_text_encoder_is_seeded_and_zero_padded():
    prompts = ["a cat on a café table 🐈", "x"]
    a = toy_text_encoder(seed=3)(prompts)["prompt_embeds"]
    b = toy_text_encoder(seed=3)(prompts)["prompt_embeds"]
    c = toy_text_encoder(seed=4)(prompts)["prompt_embeds"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    # "x" is one byte-level token plus </s>: everything after is exactly zero
    n_valid = len(toy_tokenizer()("x")["input_ids"])
    assert (a[1, :n_valid] != 0).any(-1).all() and (a[1, n_valid:] == 0).all()


def test_toy_tokenizer_round_trips_any_utf8():
    tok = toy_tokenizer()
    text = "Ünïcödé — 中文 prompt, emoji 🐈"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == text


def test_toy_vae_geometry_matches_wan():
    vae = toy_vae(z_dim=4)
    px = vae.decode(torch.randn(1, 3, 4, 8, 8))
    assert px.shape == (1, 1 + 4 * 2, 3, 64, 64)  # 4x temporal (causal first frame), 8x spatial
    assert vae.encode(px.permute(0, 2, 1, 3, 4)).shape == (1, 3, 4, 8, 8)
