"""Weight formats: official safetensors (single and sharded), diffusers names, Self-Forcing `.pt`."""

from __future__ import annotations

import pytest
import torch

from tests.wan_helpers import diffusers_twin, randomize_
from wan import CausalWanModel, WanConfig, WanModel
from wan.weights import (
    WeightLoadError,
    diffusers_to_official,
    load_dit_weights,
    read_dit_weights,
    write_safetensors,
    write_self_forcing_pt,
)

TINY = WanConfig.preset("tiny")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_diffusers_names_round_trip_through_diffusers_itself(tmp_path):
    ours = randomize_(WanModel(TINY), seed=11)
    ref = diffusers_twin(TINY, ours.state_dict())  # strict load inside: every name maps
    ref.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    assert _same(diffusers_to_official(ref.state_dict()), ours.state_dict())
    # a diffusers-format model folder loads into our model
    loaded = read_dit_weights(tmp_path)
    fresh = WanModel(TINY)
    load_dit_weights(fresh, loaded)
    assert _same(fresh.state_dict(), ours.state_dict())


@pytest.mark.parametrize("shard_bytes", [None, 4096])
@pytest.mark.parametrize("diffusers", [False, True])
def test_safetensors_single_and_sharded(tmp_path, shard_bytes, diffusers):
    sd = randomize_(WanModel(TINY), seed=2).state_dict()
    out = write_safetensors(sd, tmp_path / "w", max_shard_bytes=shard_bytes, diffusers=diffusers)
    if shard_bytes:
        assert (
            len(list(out.glob("*.safetensors"))) > 1
            and (out / "diffusion_pytorch_model.safetensors.index.json").exists()
        )
    model = CausalWanModel(TINY)  # the causal generator loads the same files
    load_dit_weights(model, read_dit_weights(out))
    assert _same(model.state_dict(), sd)


def test_self_forcing_pt_with_wrapper_segments(tmp_path):
    gen = randomize_(CausalWanModel(TINY), seed=4).state_dict()
    ema = {k: v + 1 for k, v in gen.items()}
    # upstream EMA keys can carry FSDP segments; the generator has the clean `model.` prefix
    noisy_ema = {
        f"model._fsdp_wrapped_module.{k.replace('blocks.', 'blocks._checkpoint_wrapped_module.', 0)}": v
        for k, v in ema.items()
    }
    path = tmp_path / "model.pt"
    write_self_forcing_pt(path, gen, critic=gen)
    obj = torch.load(path, weights_only=True)
    assert set(obj) == {"generator", "critic"} and all(k.startswith("model.") for k in obj["generator"])
    obj["generator_ema"] = {k: v for k, v in noisy_ema.items()}
    obj["generator_ema"]["model._orig_mod.head.head.bias"] = obj["generator_ema"].pop(
        "model._fsdp_wrapped_module.head.head.bias"
    )
    torch.save(obj, path)
    assert _same(read_dit_weights(path, "generator"), gen)
    assert _same(read_dit_weights(path, "generator_ema"), ema)


def test_upstream_ode_init_model_key(tmp_path):
    gen = randomize_(CausalWanModel(TINY), seed=5).state_dict()
    torch.save({"model": {f"model.{k}": v for k, v in gen.items()}}, tmp_path / "ode_init.pt")
    assert _same(read_dit_weights(tmp_path / "ode_init.pt", "generator"), gen)


def test_bad_keys_are_all_named_in_one_error():
    sd = WanModel(TINY).state_dict()
    sd.pop("blocks.0.self_attn.q.weight")
    sd["blocks.0.extra.weight"] = torch.zeros(1)
    sd["head.head.bias"] = torch.zeros(3)
    with pytest.raises(WeightLoadError) as err:
        load_dit_weights(WanModel(TINY), sd)
    msg = str(err.value)
    assert "blocks.0.self_attn.q.weight" in msg and "blocks.0.extra.weight" in msg and "head.head.bias" in msg


def test_missing_shard_is_named(tmp_path):
    out = write_safetensors(WanModel(TINY).state_dict(), tmp_path / "w", max_shard_bytes=4096)
    victim = sorted(out.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        read_dit_weights(out)


def test_pt_without_requested_entry(tmp_path):
    torch.save({"critic": {}}, tmp_path / "c.pt")
    with pytest.raises(WeightLoadError, match="generator"):
        read_dit_weights(tmp_path / "c.pt", "generator")
