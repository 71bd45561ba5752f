"""Run the whole Self-Forcing recipe on the shapes world and write `<out>/report.md`.

    python3 scripts/world_chain.py                      # quick profile (~12 min on 2 cores) -> runs/world
    python3 scripts/world_chain.py --profile full       # the full chain (targets in the report)
    python3 scripts/world_chain.py --profile smoke --out /tmp/world   # CI: the chain and report, not quality

Re-running the command skips finished stages and resumes an interrupted one. See world/chain.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from world.chain import PROFILES, Chain  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument(
        "--out", default=None, help="run root (default: runs/world for quick, runs/world_<profile> otherwise)"
    )
    p.add_argument("--nproc", type=int, default=None, help="processes per training stage (torchrun)")
    p.add_argument(
        "--random_start", action="store_true",
        help="the world whose objects start anywhere along their path (networks without frame rows; "
        "long rollouts in a window without a sink): see world/chain.py",
    )  # fmt: skip
    args = p.parse_args(argv)
    profile = PROFILES[args.profile]
    if args.nproc is not None:
        profile = dataclasses.replace(profile, nproc=args.nproc)
    if args.random_start:
        profile = dataclasses.replace(profile, random_start=True)
    out = args.out or ("runs/world" if args.profile == "quick" else f"runs/world_{args.profile}")
    Chain(out, profile).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
