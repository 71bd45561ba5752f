"""Run the whole Self-Forcing recipe on the shapes world and write `<out>/report.md`.

    python3 scripts/world_chain.py                      # quick profile (~12 min on 2 cores) -> runs/world
    python3 scripts/world_chain.py --profile full       # the full chain (targets in the report)
    python3 scripts/world_chain.py --profile smoke --out /tmp/world   # CI: the chain and report, not quality
    python3 scripts/world_chain.py --profile full --random_start --baselines dmd_teacher_forcing \
        dmd_diffusion_forcing --no_i2v --long_samples 32 --distill_seed 4   # the DMD students only, seed 4
    python3 scripts/world_chain.py --profile full --random_start --network num_layers=4   # a deeper network

Re-running the command skips finished stages and resumes an interrupted one. See world/chain.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan import WanConfig  # noqa: E402
from world.chain import CONFIG_OF, PROFILES, STUDENTS, Chain, Profile  # noqa: E402

BASELINES = STUDENTS[2:]  # every student but the ODE init and Self-Forcing DMD
NETWORK_ROLES = ("generator_model", "fake_score_model")  # the world's networks in every stage's config


def profile_from_args(args: argparse.Namespace) -> Profile:
    """The named profile with the command line's changes (the rest of the chain is the same)."""
    profile = PROFILES[args.profile]
    changes: dict = {}
    if args.nproc is not None:
        changes["nproc"] = args.nproc
    if args.jobs is not None:
        changes["jobs"] = args.jobs
    if args.base_low_lr_steps is not None:
        changes["base_low_lr_steps"] = args.base_low_lr_steps
    if args.random_start:
        changes["random_start"] = True
    if args.baselines is not None:
        changes["baselines"] = tuple(args.baselines)
    if args.no_i2v:
        changes["i2v"] = False
    if args.long_samples is not None:
        changes["long_samples"] = args.long_samples
    if args.eval_samples is not None:
        changes["eval_samples"] = args.eval_samples
    overrides = profile.overrides
    if args.network:  # every network of every training stage: each starts from the one before
        net = [f"{role}.{change}" for role in NETWORK_ROLES for change in args.network]
        overrides = {s: [*overrides.get(s, []), *net] for s in CONFIG_OF}
    if args.distill_seed is not None:  # every stage after the ODE init: same init, another seed
        seed = f"seed={args.distill_seed}"
        distill = [s for s in CONFIG_OF if s not in ("base", "ode", "ode_i2v")]
        overrides = {**overrides, **{s: [*overrides.get(s, []), seed] for s in distill}}
    if overrides is not profile.overrides:
        changes["overrides"] = overrides
    return dataclasses.replace(profile, **changes)


def network_change(text: str) -> str:
    """argparse type of `--network`: `FIELD=VALUE` with FIELD a `WanConfig` field."""
    field, sep, value = text.partition("=")
    names = {f.name for f in dataclasses.fields(WanConfig)}
    if not sep or not value or field not in names:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not FIELD=VALUE with FIELD one of {', '.join(sorted(names))}"
        )
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument(
        "--out", default=None, help="run root (default: runs/world for quick, runs/world_<profile> otherwise)"
    )
    p.add_argument("--nproc", type=int, default=None, help="processes per training stage (torchrun)")
    p.add_argument(
        "--jobs", type=int, default=None,
        help="distillation stages trained side by side, the cores split between them (default: the "
        "profile's; they all start from the ODE init)",
    )  # fmt: skip
    p.add_argument(
        "--random_start", action="store_true",
        help="the world whose objects start anywhere along their path (networks without frame rows; "
        "long rollouts in a window without a sink): see world/chain.py",
    )  # fmt: skip
    p.add_argument(
        "--baselines", nargs="*", choices=BASELINES, default=None, metavar="STAGE",
        help=f"the baselines to train and judge (default: the profile's); any of {', '.join(BASELINES)}",
    )  # fmt: skip
    p.add_argument(
        "--base_low_lr_steps", type=int, default=None, metavar="N",
        help="train the base's last N steps at a 10x lower LR (configs/world/base.yaml's lr_min; default: the "
        "profile's)",
    )  # fmt: skip
    p.add_argument("--no_i2v", action="store_true", help="leave out the image-to-video stage")
    p.add_argument("--long_samples", type=int, default=None, help="36-frame rollouts per held-out prompt")
    p.add_argument(
        "--eval_samples", type=int, default=None,
        help="samples per evaluated prompt at the training length (and continuations per held-out prompt); "
        "more narrows every interval (default: the profile's)",
    )  # fmt: skip
    p.add_argument(
        "--distill_seed", type=int, default=None,
        help="training seed of every distillation stage (the configs' own: 3); base, ODE pairs and ODE init "
        "are unchanged, so a run root holding them can be copied and only the students re-trained",
    )  # fmt: skip
    p.add_argument(
        "--network", nargs="+", type=network_change, default=None, metavar="FIELD=VALUE",
        help="change the world network of every training stage (a WanConfig field of world/network.py's "
        "NETWORK, e.g. num_layers=4): the base, the ODE init and every student, generator and critic alike",
    )  # fmt: skip
    args = p.parse_args(argv)
    for flag in ("long_samples", "eval_samples"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    try:
        profile = profile_from_args(args)
    except ValueError as err:  # the profile's own checks (--jobs, --base_low_lr_steps)
        p.error(str(err))
    out = args.out or ("runs/world" if args.profile == "quick" else f"runs/world_{args.profile}")
    Chain(out, profile).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
