"""LoRA adapters through peft (Hu et al. 2021, `W x + (alpha / r) B A x`), for any `nn.Module`.

The trainer injects adapters into a DiT (on the meta device for the sharded copy, on the CPU for
rank 0's weight-holding copy), so they become submodules of each transformer block and FSDP2
shards them with their block. Only adapter parameters train; the base layers are frozen.

After injection a targeted `nn.Linear` named `X` holds its weights under `X.base_layer.*` and the
adapter under `X.lora_A.default.weight` / `X.lora_B.default.weight`. Outside the model (files,
merging) adapters use peft's saved layout without the adapter name: `X.lora_A.weight` ([r, in]) and
`X.lora_B.weight` ([out, r]), with one `alpha` and `rank` for the whole set (`LoraWeights`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ADAPTER = "default"
# DiffSynth-Studio's default for Wan: both attentions' q/k/v/o and the two FFN linears of every block
# (peft matches a target against the end of a module name, so "q" is self_attn.q and cross_attn.q).
DEFAULT_TARGET_MODULES = ("q", "k", "v", "o", "ffn.0", "ffn.2")
LORA_ROLES = ("generator", "fake_score")
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel(model) keys of a saved adapter
_BASE = ".base_layer"
_PARTS = ("lora_A", "lora_B")


@dataclass(frozen=True)
class LoraSpec:
    """Shape of the adapters to train: rank r, alpha (the update is scaled by alpha / r) and targets."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.rank}")
        if not self.target_modules:
            raise ValueError("lora_target_modules is empty")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass
class LoraWeights:
    """A set of adapters outside a model: `{"<module>.lora_A.weight": [r, in], "<module>.lora_B.weight":
    [out, r]}` (module names of the model they adapt), applied as `W + (alpha / rank) B A`."""

    state_dict: dict[str, torch.Tensor]
    alpha: float
    rank: int

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def modules(self) -> list[str]:
        return sorted({k.rsplit(".lora_", 1)[0] for k in self.state_dict})


def parse_names(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """`"a,b"` (DiffSynth's comma-separated form), `["a", "b"]` or None -> ("a", "b") / ()."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(s).strip() for s in items if str(s).strip())


def _matches(name: str, target: str) -> bool:
    # peft's rule for a list of targets: the full name, or a suffix after a dot
    return name == target or name.endswith("." + target)


def valid_target_names(module: nn.Module) -> list[str]:
    """Names a target may use: every `nn.Linear`'s name, with `blocks.<i>.` removed (one entry for all blocks)."""
    names = set()
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            parts = name.split(".")
            if "blocks" in parts[:-2] and parts[parts.index("blocks") + 1].isdigit():
                name = ".".join(parts[parts.index("blocks") + 2 :])
            names.add(name)
    return sorted(names)


def check_target_modules(module: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full names of the `nn.Linear` modules the targets select; one error naming every target that
    selects none, with the list of valid names."""
    linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    bad = [t for t in targets if not any(_matches(n, t) for n in linears)]
    if bad:
        raise ValueError(
            f"lora_target_modules {bad} match no linear layer of {type(module).__name__}; valid names "
            f"(a name matches any module ending with it): {valid_target_names(module)}"
        )
    return [n for n in linears if any(_matches(n, t) for t in targets)]


def add_lora(module: nn.Module, spec: LoraSpec) -> nn.Module:
    """Inject peft LoRA layers (B = 0, A Kaiming-uniform from the global RNG) into `module`, in place;
    freeze everything else in `module`. Works on the meta device (adapters are created there too)."""
    from peft import LoraConfig, inject_adapter_in_model

    check_target_modules(module, spec.target_modules)
    config = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.target_modules), lora_dropout=0.0
    )
    inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    train_adapters_only(module)
    return module


def train_adapters_only(module: nn.Module) -> None:
    """Adapter parameters require grad, every other parameter of `module` is frozen."""
    for name, p in module.named_parameters():
        p.requires_grad_(is_lora_key(name))


@torch.no_grad()
def load_adapters(module: nn.Module, lora: LoraWeights, spec: LoraSpec) -> None:
    """Copy saved adapters into the injected ones of `module` (same modules, same rank). B is rescaled
    when the file's alpha / r differs from `spec`'s, so the update is the file's; else copied exactly."""
    own = {k: v for k, v in module.state_dict().items() if is_lora_key(k)}
    wanted = adapter_state_dict(lora.state_dict)
    missing, unexpected = sorted(own.keys() - wanted.keys()), sorted(wanted.keys() - own.keys())
    if missing or unexpected or lora.rank != spec.rank:
        raise ValueError(
            f"saved adapters (rank {lora.rank}) do not fit the model's (rank {spec.rank}, targets "
            f"{list(spec.target_modules)}): missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    ratio = lora.scaling / spec.scaling
    for key, value in wanted.items():
        if ".lora_B." in key and ratio != 1.0:
            value = value.float() * ratio
        own[key].copy_(value)


def is_lora_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def has_lora(sd_or_module: Mapping[str, torch.Tensor] | nn.Module) -> bool:
    keys = (
        (n for n, _ in sd_or_module.named_parameters())
        if isinstance(sd_or_module, nn.Module)
        else iter(sd_or_module)
    )
    return any(is_lora_key(k) for k in keys)


def split_lora_state_dict(
    sd: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A state dict of a model with injected adapters -> (base weights under the original names,
    adapters in the saved layout `X.lora_A.weight`). Keys without adapters pass through as base."""
    base, lora = {}, {}
    for key, value in sd.items():
        if is_lora_key(key):
            for part in _PARTS:
                key = key.replace(f".{part}.{ADAPTER}.", f".{part}.")
            lora[key] = value
        else:
            base[key.replace(_BASE + ".", ".")] = value
    return base, lora


def adapter_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Saved-layout adapters -> keys of a model with injected adapters (`X.lora_A.default.weight`)."""
    out = {}
    for key, value in sd.items():
        for part in _PARTS:
            key = key.replace(f".{part}.weight", f".{part}.{ADAPTER}.weight")
        out[key] = value
    return out


def merge_lora(
    base: Mapping[str, torch.Tensor], lora: LoraWeights, scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """`W + scale * (alpha / r) * B @ A` for every adapted module (computed in fp32, cast back)."""
    out = dict(base)
    for module in lora.modules():
        key = f"{module}.weight"
        if key not in out:
            raise KeyError(f"adapter for {module!r} has no base weight {key!r} to merge into")
        a = lora.state_dict[f"{module}.lora_A.weight"].float()
        b = lora.state_dict[f"{module}.lora_B.weight"].float()
        w = out[key]
        out[key] = (w.float() + (scale * lora.scaling) * (b @ a)).to(w.dtype)
    return out


def set_adapter_scale(module: nn.Module, scale: float) -> None:
    """Set every injected adapter's contribution to `scale` x (alpha / r) (peft `LoraLayer.set_scale`)."""
    from peft.tuners.lora import LoraLayer

    for sub in module.modules():
        if isinstance(sub, LoraLayer):
            sub.set_scale(ADAPTER, scale)


# ------------------------------------------------------------------------------------------------
# peft's own file format: <dir>/adapter_config.json + <dir>/adapter_model.safetensors
# ------------------------------------------------------------------------------------------------


def write_peft_adapter(lora: LoraWeights, out_dir: str | Path) -> Path:
    """peft's layout, loadable with `PeftModel.from_pretrained(model, out_dir)` on a model whose module
    names are the adapter's (here: the Wan DiT with official names)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=lora.modules(), lora_dropout=0.0)
    config.save_pretrained(str(out))
    tensors = {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in lora.state_dict.items()}
    save_file(tensors, str(out / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    return out


def read_peft_adapter(path: str | Path) -> LoraWeights:
    from safetensors.torch import load_file

    path = Path(path)
    config = json.loads((path / PEFT_CONFIG_NAME).read_text(encoding="utf-8"))
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{path}: per-module rank/alpha patterns are not supported")
    sd = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(path / PEFT_WEIGHTS_NAME)).items()}
    return LoraWeights(sd, alpha=float(config["lora_alpha"]), rank=int(config["r"]))
