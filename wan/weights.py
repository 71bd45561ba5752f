"""Weight formats of the Wan DiT: official Wan2.1, diffusers, and Self-Forcing `.pt` checkpoints.

* official: `diffusion_pytorch_model.safetensors` or sharded `...-0000k-of-0000n.safetensors` plus
  `diffusion_pytorch_model.safetensors.index.json`, keys as in spec §1.7 (our module names);
* diffusers: `WanTransformer3DModel` names (`transformer/` folder, same file layout);
* Self-Forcing: `torch.save` dict with `generator` / `generator_ema` / `critic`, keys prefixed with
  `model.` and possibly FSDP / checkpoint / compile segments.

Nothing here downloads anything: every path comes from the caller.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from utils.errors import UserError

logger = logging.getLogger(__name__)

SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
SAFETENSORS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
SELF_FORCING_KEYS = ("generator", "generator_ema", "critic", "model")

# Official name -> diffusers name, for the parts outside the blocks.
_TOP_LEVEL = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
# Official name -> diffusers name inside `blocks.{i}.` (diffusers swaps norm2 / norm3).
_IN_BLOCK = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}


class WeightLoadError(UserError, ValueError):
    """Weights that cannot be used: a state dict that does not match the model (every missing,
    unexpected and mis-shaped key named), or a file that is not a readable weights-only checkpoint."""


def raise_key_problems(source: str, missing, unexpected, misshaped, limit: int = 20) -> None:
    """One error naming every missing, unexpected and mis-shaped key (first `limit` of each kind)."""
    parts = []
    for name, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        items = sorted(items)
        if items:
            parts.append(f"{len(items)} {name} keys: {items[:limit]}{' ...' if len(items) > limit else ''}")
    if parts:
        raise WeightLoadError(f"{source}: " + "; ".join(parts))


def _rename(key: str, table: Mapping[str, str]) -> str | None:
    for src, dst in table.items():
        if key == src or key.startswith(src + "."):
            return dst + key[len(src) :]
    return None


# One naming direction is the other's inverse: (head modulation, block modulation, top table, block table).
_TO_DIFFUSERS = (
    "head.modulation",
    "scale_shift_table",
    "modulation",
    "scale_shift_table",
    _TOP_LEVEL,
    _IN_BLOCK,
)
_TO_OFFICIAL = (
    "scale_shift_table",
    "head.modulation",
    "scale_shift_table",
    "modulation",
    {v: k for k, v in _TOP_LEVEL.items()},
    {v: k for k, v in _IN_BLOCK.items()},
)


def _convert_key(key: str, rules: tuple, target: str) -> str:
    head_src, head_dst, mod_src, mod_dst, top, in_block = rules
    if key == head_src:
        return head_dst
    m = re.match(r"blocks\.(\d+)\.(.+)$", key)
    if m:
        i, rest = m.groups()
        if rest == mod_src:
            return f"blocks.{i}.{mod_dst}"
        new = _rename(rest, in_block)
        return f"blocks.{i}.{new if new is not None else rest}"
    new = _rename(key, top)
    if new is None:
        raise KeyError(f"no {target} name for Wan key {key!r}")
    return new


def official_to_diffusers_key(key: str) -> str:
    return _convert_key(key, _TO_DIFFUSERS, "diffusers")


def diffusers_to_official_key(key: str) -> str:
    return _convert_key(key, _TO_OFFICIAL, "official")


def official_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {official_to_diffusers_key(k): v for k, v in sd.items()}


def diffusers_to_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {diffusers_to_official_key(k): v for k, v in sd.items()}


def looks_like_diffusers(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("condition_embedder.") or k == "scale_shift_table" for k in sd)


def strip_wrapper_prefixes(sd: Mapping[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Remove FSDP/checkpoint/compile segments anywhere in a key, then a leading `prefix`."""
    out = {}
    for k, v in sd.items():
        for seg in WRAPPER_SEGMENTS:
            k = k.replace(seg, "")
        if prefix and k.startswith(prefix):
            k = k[len(prefix) :]
        out[k] = v
    return out


# ---------------------------------------------------------------------------------------- reading
def read_safetensors_dir(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a single `.safetensors` file, or a folder with one file or an `index.json` of shards."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        return load_file(str(path))
    index = path / SAFETENSORS_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        sd: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = path / shard
            if not shard_path.exists():
                raise FileNotFoundError(f"{index} names shard {shard}, which is missing")
            sd.update(load_file(str(shard_path)))
        missing = sorted(set(weight_map) - set(sd))
        if missing:
            raise WeightLoadError(f"{index}: keys listed but absent from their shards: {missing[:10]}")
        return sd
    single = path / SAFETENSORS_NAME
    if single.exists():
        return load_file(str(single))
    raise FileNotFoundError(f"no {SAFETENSORS_NAME} or {SAFETENSORS_INDEX} in {path}")


def read_self_forcing_pt(path: str | os.PathLike, key: str = "generator") -> dict[str, torch.Tensor]:
    """Read one model from a Self-Forcing `.pt` (`generator`, `generator_ema`, `critic`, or `model`)."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is a page of advice; its one informative line names the refused global.
        reason = next((line.strip() for line in str(err).splitlines() if "Unsupported" in line), "")
        reason = reason.split(" Please use")[0]
        raise WeightLoadError(
            f"{path}: torch.load(weights_only=True) refuses it, it pickles more than tensors and "
            f"containers ({reason or type(err).__name__}); save only its state dicts (torch.save of "
            "{'generator': model.state_dict()})"
        ) from err
    except (EOFError, RuntimeError) as err:  # empty, truncated, or not a torch.save archive
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WeightLoadError(f"{path}: not a readable torch checkpoint ({detail})") from err
    if not isinstance(obj, Mapping):
        raise WeightLoadError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    if key in obj and isinstance(obj[key], Mapping):
        sd = obj[key]
    elif key == "generator" and "model" in obj and isinstance(obj["model"], Mapping):
        sd = obj["model"]  # upstream's ode_init.pt fallback
    elif all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = obj  # a bare state dict
    else:
        raise WeightLoadError(f"{path}: no {key!r} entry; it holds {sorted(obj)}")
    return strip_wrapper_prefixes(sd)


def read_dit_weights(path: str | os.PathLike, key: str = "generator") -> dict[str, torch.Tensor]:
    """Read DiT weights in any supported format and return them with official Wan key names."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path}")
    if path.is_file() and path.suffix in (".pt", ".pth", ".bin"):
        sd = read_self_forcing_pt(path, key)
    else:
        if path.is_dir() and (path / "transformer").is_dir():
            path = path / "transformer"
        sd = read_safetensors_dir(path)
        sd = strip_wrapper_prefixes(sd)
    return diffusers_to_official(sd) if looks_like_diffusers(sd) else sd


def load_dit_weights(module: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Strict load that reports every missing, unexpected and mis-shaped key in one error."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad_shape = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(sd)
        if tuple(sd[k].shape) != tuple(own[k].shape)
    )
    raise_key_problems(f"{type(module).__name__} weights do not match", missing, unexpected, bad_shape)
    module.load_state_dict(dict(sd), strict=True)


# ---------------------------------------------------------------------------------------- writing
def write_safetensors(
    sd: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    max_shard_bytes: int | None = None,
    diffusers: bool = False,
) -> Path:
    """Write official (or diffusers-named) weights, sharded with an index when `max_shard_bytes` is set."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = official_to_diffusers(sd) if diffusers else dict(sd)
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    if max_shard_bytes is None:
        save_file(sd, str(out / SAFETENSORS_NAME))
        return out
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(sd):
        nbytes = sd[k].numel() * sd[k].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = sd[k]
        size += nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out / name))
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (out / SAFETENSORS_INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return out


def to_self_forcing_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official keys -> upstream wrapper keys (`model.` prefix), fp32 on CPU."""
    return {f"model.{k}": v.detach().float().cpu() for k, v in sd.items()}


def write_self_forcing_pt(
    path: str | os.PathLike,
    generator: Mapping[str, torch.Tensor],
    critic: Mapping[str, torch.Tensor] | None = None,
    generator_ema: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write an upstream-compatible `.pt`: `generator` (+ `critic`, `generator_ema`), `model.`-prefixed."""
    obj = {"generator": to_self_forcing_state_dict(generator)}
    if critic is not None:
        obj["critic"] = (
            dict(critic)
            if any(k.startswith("model.") for k in critic)
            else to_self_forcing_state_dict(critic)
        )
    if generator_ema is not None:
        obj["generator_ema"] = to_self_forcing_state_dict(generator_ema)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, str(path))
