"""Export a training run to upstream Self-Forcing's `.pt`, safetensors, and LoRA adapter files.

    python scripts/export_checkpoint.py --logdir runs/dmd --output exported/
    python scripts/export_checkpoint.py --logdir runs/dmd_lora --output exported/ [--merged_pt] [--use_ema 0.999]

Full-weight runs: `exported/model.pt` with `generator`, `critic` and (once EMA has started)
`generator_ema`, each with upstream's `model.`-prefixed Wan keys in fp32 (loadable by upstream's
inference.py and by ours), plus `exported/generator/` and `exported/generator_ema[_<rate>]/` as
official-format safetensors folders (`--diffusers` writes diffusers names instead).

LoRA runs (`lora_base_model`): the adapters alone, one folder per set (`generator_lora/`,
`generator_ema[_<rate>]_lora/`, `critic_lora/`), each holding diffusers' layout
(`pytorch_lora_weights.safetensors`, for `WanPipeline.load_lora_weights`) and peft's own
(`adapter_config.json` + `adapter_model.safetensors`). `--merged_pt` also writes `model.pt` with
the adapters merged into the base weights.

With several EMA rates, every rate is exported; `model.pt`'s `generator_ema` is the `--use_ema`
rate (default: the slowest). `--checkpoint` picks one checkpoint directory instead of the newest.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from utils.checkpoint import (
    CheckpointError,
    export_upstream_pt,
    read_run_counters,
    read_run_model,
    run_ema_entries,
    select_ema_entry,
)
from utils.errors import exit_code_of
from utils.lora import LoraWeights, has_lora, merge_lora, split_lora_state_dict, write_peft_adapter
from wan.lora_weights import write_diffusers_lora
from wan.weights import strip_wrapper_prefixes, write_safetensors

logger = logging.getLogger("export_checkpoint")
WRAPPER_PREFIX = "model."


def _run_lora_shape(source: Path) -> tuple[float, int] | None:
    """(lora_alpha, lora_rank) from the run's config.yaml; None when the run trained no adapters."""
    from omegaconf import OmegaConf

    from utils.checkpoint import resolve_checkpoint_dir

    config = resolve_checkpoint_dir(source).parent.parent / "config.yaml"
    if not config.is_file():
        raise CheckpointError(f"{config} is missing: a LoRA run's alpha and rank are read from it")
    cfg = OmegaConf.load(config)
    rank = int(cfg.lora_rank)
    return float(rank if cfg.get("lora_alpha") is None else cfg.lora_alpha), rank


def _adapters(sd: dict[str, torch.Tensor], alpha: float, rank: int) -> LoraWeights:
    """Wrapper-keyed adapters (`model.blocks...lora_A.default.weight`) -> official-named LoraWeights."""
    _, lora = split_lora_state_dict(sd)
    return LoraWeights(strip_wrapper_prefixes(lora), alpha=alpha, rank=rank)


def _write_adapters(lora: LoraWeights, folder: Path) -> None:
    write_peft_adapter(lora, folder)
    write_diffusers_lora(lora, folder)


def export(
    source: Path,
    output: Path,
    diffusers: bool = False,
    use_ema: float | None = None,
    merged_pt: bool = False,
) -> Path:
    counters = read_run_counters(source)
    generator = read_run_model(source, "generator")
    try:
        critic = read_run_model(source, "critic")
    except KeyError:
        critic = None  # objectives without a critic (ode, diffusion)
    emas = run_ema_entries(source)  # rate -> checkpoint entry (none when the run keeps no EMA)
    if use_ema is not None:  # an EMA asked for by rate must exist (the refusal lists the rates kept)
        select_ema_entry(source, use_ema)
    if emas and not counters.get("ema_active"):  # before ema_start_step: upstream's files have no EMA either
        try:  # the checkpoint's own refusal names ema_start_step and the run's step
            read_run_model(source, next(iter(emas.values())))
        except CheckpointError as err:
            if use_ema is not None:  # asked for by name: not there yet is an error, not a warning
                raise CheckpointError(f"--use_ema {use_ema}: {err}") from err
            logger.warning("%s; exporting without generator_ema", err)
        emas = {}
    ema_sds = {rate: read_run_model(source, name) for rate, name in emas.items()}
    chosen = None  # the rate that goes into model.pt's generator_ema
    if emas:
        entry = (
            select_ema_entry(source, use_ema) if use_ema is not None or len(emas) == 1 else emas[max(emas)]
        )
        chosen = next(r for r, name in emas.items() if name == entry)
    output.mkdir(parents=True, exist_ok=True)

    def ema_name(rate: float) -> str:
        return "generator_ema" if len(emas) == 1 else f"generator_ema_{rate}"

    lora_run = has_lora(generator) or (critic is not None and has_lora(critic))
    if not lora_run:
        path = export_upstream_pt(output / "model.pt", generator, critic, ema_sds.get(chosen))
        write_safetensors(strip_wrapper_prefixes(generator), output / "generator", diffusers=diffusers)
        for rate, sd in ema_sds.items():
            write_safetensors(strip_wrapper_prefixes(sd), output / ema_name(rate), diffusers=diffusers)
        logger.info("exported step %s of %s to %s", counters.get("step"), source, output)
        return path

    # LoRA run: adapters alone; the merged .pt on request.
    alpha, rank = _run_lora_shape(source)
    merged: dict[str, dict[str, torch.Tensor] | None] = {"generator": None, "critic": None, "ema": None}
    for role, sd in (("generator", generator), ("critic", critic)):
        if sd is None:
            continue
        if has_lora(sd):
            lora = _adapters(sd, alpha, rank)
            _write_adapters(lora, output / f"{role}_lora")
            base, _ = split_lora_state_dict(sd)
            merged[role] = merge_lora(base, _prefixed(lora))
        else:
            merged[role] = sd
    base, _ = split_lora_state_dict(generator)
    for rate, sd in ema_sds.items():
        lora = _adapters(sd, alpha, rank)
        _write_adapters(lora, output / f"{ema_name(rate)}_lora")
        if rate == chosen:
            merged["ema"] = merge_lora(base, _prefixed(lora))
    path = output
    if merged_pt:
        path = export_upstream_pt(output / "model.pt", merged["generator"], merged["critic"], merged["ema"])
    logger.info("exported the adapters of step %s of %s to %s", counters.get("step"), source, output)
    return path


def _prefixed(lora: LoraWeights) -> LoraWeights:
    return LoraWeights({WRAPPER_PREFIX + k: v for k, v in lora.state_dict.items()}, lora.alpha, lora.rank)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logdir", help="run directory (its newest complete checkpoint is exported)")
    p.add_argument("--checkpoint", help="one checkpoint directory (<logdir>/checkpoints/step_XXXXXXXX)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--diffusers", action="store_true", help="safetensors with diffusers parameter names")
    p.add_argument("--use_ema", type=float, default=None, help="EMA rate for model.pt's generator_ema")
    p.add_argument("--merged_pt", action="store_true", help="LoRA runs: also write model.pt, adapters merged")
    args = p.parse_args(argv)
    if (args.logdir is None) == (args.checkpoint is None):
        p.error("pass exactly one of --logdir and --checkpoint")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s] %(message)s")
    # Exit codes as train.py's: 2 and one `error:` line for what the user can fix (a path that holds
    # no checkpoint, an EMA the run does not have); anything else is a bug and keeps its traceback.
    return exit_code_of(
        lambda: export(
            Path(args.logdir or args.checkpoint),
            Path(args.output),
            diffusers=args.diffusers,
            use_ema=args.use_ema,
            merged_pt=args.merged_pt,
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())
