"""Export a training run to upstream Self-Forcing's `.pt` (and safetensors for the generator).

    python scripts/export_checkpoint.py --logdir runs/dmd --output exported/

Writes `exported/model.pt` with `generator`, `critic` and (once EMA has started) `generator_ema`,
each with upstream's `model.`-prefixed Wan keys in fp32 (loadable by upstream's inference.py and by
ours), plus `exported/generator/` and `exported/generator_ema/` as official-format safetensors
folders (`--diffusers` writes diffusers names instead). `--checkpoint` picks one checkpoint directory
instead of the newest in the run.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from utils.checkpoint import CheckpointError, export_upstream_pt, read_run_counters, read_run_model
from wan.weights import strip_wrapper_prefixes, write_safetensors

logger = logging.getLogger("export_checkpoint")


def export(source: Path, output: Path, diffusers: bool = False) -> Path:
    counters = read_run_counters(source)
    generator = read_run_model(source, "generator")
    try:
        critic = read_run_model(source, "critic")
    except KeyError:
        critic = None  # objectives without a critic (ode, diffusion)
    try:
        ema = read_run_model(source, "ema")
    except CheckpointError as err:  # before ema_start_step: upstream's files then have no EMA either
        logger.warning("%s; exporting without generator_ema", err)
        ema = None
    output.mkdir(parents=True, exist_ok=True)
    pt = export_upstream_pt(output / "model.pt", generator, critic, ema)
    for name, sd in (("generator", generator), ("generator_ema", ema)):
        if sd is not None:
            write_safetensors(strip_wrapper_prefixes(sd), output / name, diffusers=diffusers)
    logger.info("exported step %s of %s to %s", counters.get("step"), source, output)
    return pt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logdir", help="run directory (its newest complete checkpoint is exported)")
    p.add_argument("--checkpoint", help="one checkpoint directory (<logdir>/checkpoints/step_XXXXXXXX)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--diffusers", action="store_true", help="safetensors with diffusers parameter names")
    args = p.parse_args(argv)
    if (args.logdir is None) == (args.checkpoint is None):
        p.error("pass exactly one of --logdir and --checkpoint")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s] %(message)s")
    export(Path(args.logdir or args.checkpoint), Path(args.output), diffusers=args.diffusers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
