"""LoRA files of the Wan DiT: diffusers' layout (what `WanPipeline.load_lora_weights` reads), peft's
own layout, and the original-Wan layout many community LoRAs use.

Inside this codebase adapters carry official Wan module names (`blocks.0.self_attn.q.lora_A.weight`,
see `utils.lora.LoraWeights`); this file converts at the boundary.

* diffusers: one `pytorch_lora_weights.safetensors`, keys `transformer.<diffusers module>.lora_A.weight`
  / `.lora_B.weight`. Written with alpha / r folded into `lora_B`, so any diffusers version (with or
  without LoRA metadata support) applies exactly our update with its default alpha = r.
* peft: a folder with `adapter_config.json` + `adapter_model.safetensors` (`utils.lora`).
* original Wan: keys `diffusion_model.<official module>.lora_A/lora_down.weight`, `lora_B/lora_up`,
  optional per-module `.alpha`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from utils.lora import PEFT_CONFIG_NAME, LoraWeights, read_peft_adapter

from .weights import diffusers_to_official_key, official_to_diffusers_key

DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"
DIFFUSERS_PREFIX = "transformer."
ORIGINAL_PREFIX = "diffusion_model."
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry (LoraConfig kwargs)


def _split(key: str) -> tuple[str, str]:
    """`<module>.lora_A.weight` -> (module, "lora_A"); also accepts `lora_down` / `lora_up`."""
    for part, alias in (("lora_A", "lora_down"), ("lora_B", "lora_up")):
        for name in (part, alias):
            suffix = f".{name}.weight"
            if key.endswith(suffix):
                return key[: -len(suffix)], part
    raise ValueError(f"{key!r} is not a LoRA weight (expected <module>.lora_A.weight / .lora_B.weight)")


def write_diffusers_lora(lora: LoraWeights, out_dir: str | Path) -> Path:
    """`<out_dir>/pytorch_lora_weights.safetensors` in diffusers' Wan layout (alpha / r folded into B)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in lora.state_dict.items():
        module, part = _split(key)
        value = value.detach().float().cpu()
        if part == "lora_B":
            value = value * lora.scaling
        tensors[f"{DIFFUSERS_PREFIX}{official_to_diffusers_key(module)}.{part}.weight"] = value.contiguous()
    save_file(tensors, str(out / DIFFUSERS_LORA_NAME), metadata={"format": "pt"})
    return out / DIFFUSERS_LORA_NAME


def read_lora(path: str | Path) -> LoraWeights:
    """Adapters from any supported file or folder, with official Wan module names."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        if (path / PEFT_CONFIG_NAME).is_file():
            return read_peft_adapter(path)
        if (path / DIFFUSERS_LORA_NAME).is_file():
            path = path / DIFFUSERS_LORA_NAME
        else:
            raise FileNotFoundError(
                f"{path}: neither a peft adapter folder nor one with {DIFFUSERS_LORA_NAME}"
            )
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    raw = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if all(k.startswith(DIFFUSERS_PREFIX) for k in raw):
        return _from_named(raw, DIFFUSERS_PREFIX, diffusers_to_official_key, _metadata_alpha(metadata))
    if all(k.startswith(ORIGINAL_PREFIX) for k in raw):
        return _from_named(raw, ORIGINAL_PREFIX, lambda k: k, None)
    return _from_named(raw, "", lambda k: k, None)


def _metadata_alpha(metadata: dict[str, str]) -> float | None:
    raw = metadata.get(_METADATA_KEY)
    if not raw:
        return None
    config = json.loads(raw)
    alpha = config.get(f"{DIFFUSERS_PREFIX}lora_alpha", config.get("lora_alpha"))
    return None if alpha is None else float(alpha)


def _from_named(raw: dict[str, torch.Tensor], prefix: str, rename, alpha: float | None) -> LoraWeights:
    """Strip `prefix`, rename modules to official names, fold per-module `.alpha` entries into B."""
    alphas = {
        k.removeprefix(prefix)[: -len(".alpha")]: float(v) for k, v in raw.items() if k.endswith(".alpha")
    }
    sd: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if key.endswith(".alpha"):
            continue
        module, part = _split(key.removeprefix(prefix))
        sd[f"{rename(module)}.{part}.weight"] = value
    ranks = {v.shape[0] for k, v in sd.items() if k.endswith(".lora_A.weight")}
    if len(ranks) != 1:
        raise ValueError(f"LoRA file has adapters of ranks {sorted(ranks)}; one rank is supported")
    rank = ranks.pop()
    if alphas:  # per-module alpha: fold alpha_m / r into B and use alpha = r (scale 1) for the set
        for module, a in alphas.items():
            key = f"{rename(module)}.lora_B.weight"
            sd[key] = sd[key].float() * (a / rank)
        alpha = float(rank)
    return LoraWeights(sd, alpha=float(rank) if alpha is None else alpha, rank=rank)
