"""WanTextEncoder on a tiny random umT5 and a tokenizer built locally (no downloads).

References: a direct ``UMT5EncoderModel`` call with ids/mask tokenized here; and, for the original
checkpoint format, a umT5 encoder forward written out in this file from the spec's description
(§1.9) that reads the original Wan key names.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from wan.text_encoder import WanTextEncoder, clean_prompt

TEXT_LEN = 16
WORDS = (
    "a an the photo video of cat dog bird fish car boat tree house river mountain city street park "
    "red blue green yellow black white big small old young fast slow running jumping flying sitting "
    "in on under over with and at by near far day night sun moon rain snow & café"
).split()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # T5 appends </s> to every sequence.
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_config():
    return UMT5Config(
        vocab_size=len(WORDS) + 3,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
    )


@pytest.fixture
def encoder(tiny_config, tokenizer_dir):
    torch.manual_seed(0)
    model = UMT5EncoderModel(tiny_config)
    # T5's default init gives near-zero relative biases; make them matter for the reference checks.
    for block in model.encoder.block:
        torch.nn.init.normal_(block.layer[0].SelfAttention.relative_attention_bias.weight, std=1.0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    return WanTextEncoder(model, tok, text_len=TEXT_LEN)


PROMPTS = [
    "a red car",
    "the old dog running in the park near the river at night with a small bird",
    "a big cat sitting on a house under the moon and the sun with a blue boat by the city street far away",
]


def _direct(enc: WanTextEncoder, prompts):
    toks = enc.tokenizer(
        prompts, padding="max_length", truncation=True, max_length=TEXT_LEN, return_tensors="pt"
    )
    with torch.no_grad():
        out = enc.encoder(
            input_ids=toks["input_ids"], attention_mask=toks["attention_mask"]
        ).last_hidden_state
    return out, toks["attention_mask"].sum(1)


# ---------------------------------------------------------------------------------------------- forward


def test_padding_is_zero_and_valid_part_matches_direct_call(encoder):
    embeds = encoder(PROMPTS)["prompt_embeds"]
    assert embeds.shape == (3, TEXT_LEN, 32)
    direct, lengths = _direct(encoder, PROMPTS)
    assert lengths.tolist()[0] == 4 and lengths.tolist()[2] == TEXT_LEN  # "a red car </s>"; truncated
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(embeds[b, n:], torch.zeros_like(embeds[b, n:]))
        torch.testing.assert_close(embeds[b, :n], direct[b, :n])
        assert embeds[b, :n].abs().sum(-1).gt(0).all()


def test_prompt_cleaning(encoder):
    assert clean_prompt("  a  red\n\tcar  ") == "a red car"
    assert clean_prompt("cat &amp;amp; dog") == "cat & dog"  # double-escaped HTML
    assert clean_prompt("cafÃ©") == "café"  # ftfy repairs mojibake
    dirty = encoder(["a   photo of\n a cat &amp;amp; dog in the cafÃ©"])["prompt_embeds"]
    clean = encoder(["a photo of a cat & dog in the café"])["prompt_embeds"]
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)


def test_frozen_and_stays_in_eval(encoder):
    assert all(not p.requires_grad for p in encoder.parameters())
    torch.nn.Sequential(encoder).train()
    assert not encoder.training and not encoder.encoder.training


def test_rejects_bare_string(encoder):
    with pytest.raises(ValueError, match="list of strings"):
        encoder("a red car")


# ---------------------------------------------------------------------------------------------- original format

SPEC_BLOCK_KEYS = [
    "norm1.weight",
    "attn.q.weight",
    "attn.k.weight",
    "attn.v.weight",
    "attn.o.weight",
    "norm2.weight",
    "ffn.gate.0.weight",
    "ffn.fc1.weight",
    "ffn.fc2.weight",
    "pos_embedding.embedding.weight",
]


def _bucket(rel: int, num_buckets: int, max_dist: int) -> int:
    # Bidirectional T5 bucketing (Raffel et al. 2020): half the buckets for keys after the query,
    # exact buckets for small distances, log-spaced ones up to max_dist.
    half = num_buckets // 2
    base = half if rel > 0 else 0
    dist = abs(rel)
    exact = half // 2
    if dist < exact:
        return base + dist
    return base + min(
        half - 1, exact + int(math.log(dist / exact) / math.log(max_dist / exact) * (half - exact))
    )


def _reference_umt5(sd, ids, mask, num_heads, num_buckets=32, max_dist=128, eps=1e-6):
    """umT5 encoder per spec §1.9 on ORIGINAL key names, float64."""
    sd = {k: v.double() for k, v in sd.items()}

    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    B, L = ids.shape
    x = sd["token_embedding.weight"][ids]
    buckets = torch.tensor([[_bucket(k - q, num_buckets, max_dist) for k in range(L)] for q in range(L)])
    key_mask = torch.where(mask[:, None, None, :] > 0, 0.0, -math.inf).double()
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(layers):
        p = f"blocks.{i}."
        h = rms(x, sd[p + "norm1.weight"])
        q, k, v = (h @ sd[p + f"attn.{n}.weight"].T for n in "qkv")
        q, k, v = (t.view(B, L, num_heads, -1) for t in (q, k, v))
        pos = sd[p + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)  # [heads, Lq, Lk]
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) + pos + key_mask  # no 1/sqrt(d) in T5
        attn = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v).reshape(B, L, -1)
        x = x + attn @ sd[p + "attn.o.weight"].T
        h = rms(x, sd[p + "norm2.weight"])
        gate = F.gelu(h @ sd[p + "ffn.gate.0.weight"].T, approximate="tanh")
        x = x + ((h @ sd[p + "ffn.fc1.weight"].T) * gate) @ sd[p + "ffn.fc2.weight"].T
    return rms(x, sd["norm.weight"])


def test_original_keys_follow_spec(encoder, tiny_config):
    keys = set(encoder.to_original_state_dict())
    expected = {"token_embedding.weight", "norm.weight"}
    expected |= {f"blocks.{i}.{s}" for i in range(tiny_config.num_layers) for s in SPEC_BLOCK_KEYS}
    assert keys == expected


def test_original_round_trip_and_reference_forward(encoder, tiny_config, tokenizer_dir, tmp_path):
    original = encoder.to_original_state_dict()
    pth = tmp_path / "models_t5_umt5-tiny-enc.pth"
    torch.save({k: v.clone() for k, v in original.items()}, pth)
    loaded = WanTextEncoder.from_original(
        pth, tokenizer_dir, config=tiny_config, dtype=torch.float32, text_len=TEXT_LEN
    )
    ours = encoder(PROMPTS)["prompt_embeds"]
    torch.testing.assert_close(loaded(PROMPTS)["prompt_embeds"], ours, rtol=0, atol=0)
    assert loaded.encoder.encoder.embed_tokens.weight is loaded.encoder.shared.weight

    ids, mask = loaded.tokenize(PROMPTS)
    ref = _reference_umt5(torch.load(pth, weights_only=True), ids, mask, num_heads=tiny_config.num_heads)
    for b, n in enumerate(mask.sum(1).tolist()):
        torch.testing.assert_close(ours[b, :n].double(), ref[b, :n], rtol=1e-5, atol=1e-5)


def test_original_bad_keys_named(encoder, tiny_config, tokenizer_dir, tmp_path):
    sd = encoder.to_original_state_dict()
    sd["blocks.0.ffn.gate.weight"] = sd.pop("blocks.0.ffn.gate.0.weight")  # renamed
    del sd["blocks.1.norm2.weight"]  # missing
    sd["norm.weight"] = torch.ones(7)  # mis-shaped
    pth = tmp_path / "bad.pth"
    torch.save(sd, pth)
    with pytest.raises(ValueError) as err:
        WanTextEncoder.from_original(pth, tokenizer_dir, config=tiny_config, dtype=torch.float32)
    msg = str(err.value)
    for name in (
        "bad.pth",
        "blocks.0.ffn.gate.weight",
        "blocks.0.ffn.gate.0.weight",
        "blocks.1.norm2.weight",
    ):
        assert name in msg
    assert "norm.weight: got (7,), expected (32,)" in msg


# ---------------------------------------------------------------------------------------------- diffusers folder


def test_diffusers_folder(encoder, tmp_path):
    encoder.encoder.save_pretrained(tmp_path / "text_encoder")
    encoder.tokenizer.save_pretrained(tmp_path / "tokenizer")
    loaded = WanTextEncoder.from_diffusers_folder(tmp_path, dtype=torch.float32, text_len=TEXT_LEN)
    assert all(not p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(
        loaded(PROMPTS)["prompt_embeds"], encoder(PROMPTS)["prompt_embeds"], rtol=0, atol=0
    )
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        WanTextEncoder.from_diffusers_folder(tmp_path / "text_encoder")
