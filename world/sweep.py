"""Short probes of the shapes world's base model, one table: how the base recipe was chosen.

Each variant trains a base (the `world` network preset with some options changed, regressing the exact
teacher with the project's `TeacherRegression` objective on the training prompts' clips) in a plain
in-process loop for a fixed number of steps, then is judged exactly as the chain judges the base
(`world.sampling`: the students' 4-step schedule and a 40-step ODE on held-out and training prompts;
x0 RMSE against the exact teacher at t = 200 / 500 / 800).

    python3 -m world.sweep --variants before sincos_text sincos_text_dim128_x0 --steps 2000
    python3 -m world.sweep --table                # reprint the table from the results file

Variants run in their own processes (`--jobs` at a time, one thread each); results are appended to
`--results` (JSONL) so a sweep can be extended run by run and the table reprinted at any time.

`--distill ROOT` sweeps the distillation stage instead: Self-Forcing DMD runs (SiD for the `sid_*`
variants, which set `trainer=sid`; `train.py` with `configs/world/dmd.yaml` and the variant's overrides;
generator and critic from the ODE init) of a finished chain under ROOT, each judged on held-out prompts
with the students' pipeline (`world.sampling.generate`), in the world the chain trained in (its ODE
init's network and teacher settings: a random-start chain's, a `world_chain.py --network` change):

    python3 -m world.sweep --distill runs/world --variants dmd_ref dmd_critic_from_base --steps 300
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .chain import DMD_CRITIC_KEEPS_UP

DEFAULT_RESULTS = Path("runs/world_sweep/results.jsonl")

# Every variant is a set of changes to the network the chain shipped before this search (`BEFORE`:
# dim 64, learned position rows at std 0.02, flow head) and to its training; the last one is today's
# `world` preset with `configs/world/base.yaml` (sincos_text_dim128_x0). In the order they were run; `--list` prints them.
BEFORE = {"dim": 64, "ffn_dim": 256, "num_heads": 2, "pos_embed_type": "learned", "text_time_embedding": False,
          "predict_x0": False}  # fmt: skip
SINCOS_TEXT = {"pos_embed_type": "sincos", "text_time_embedding": True}
DIM96 = {"dim": 96, "ffn_dim": 384, "num_heads": 3}
DIM128 = {"dim": 128, "ffn_dim": 512, "num_heads": 4}
X0 = ({"predict_x0": True}, {"loss": "x0"})
VARIANTS: dict[str, tuple[dict, dict]] = {
    "before": ({}, {}),
    "learned_std0.5": ({}, {"pos_init_std": 0.5}),
    "learned_std0.5_text": ({"text_time_embedding": True}, {"pos_init_std": 0.5}),
    "sincos": ({"pos_embed_type": "sincos"}, {}),
    "sincos_text": (SINCOS_TEXT, {}),
    "sincos_text_cosine_lr3e-3": (SINCOS_TEXT, {"lr": 3e-3, "warmup": 100, "decay": "cosine"}),
    "sincos_text_dim96": ({**SINCOS_TEXT, **DIM96}, {}),
    "sincos_text_dim128": ({**SINCOS_TEXT, **DIM128}, {}),
    "sincos_text_dim128_cosine": ({**SINCOS_TEXT, **DIM128}, {"warmup": 100, "decay": "cosine"}),
    "sincos_text_x0head": ({**SINCOS_TEXT, "predict_x0": True}, {}),
    "sincos_text_x0loss": (SINCOS_TEXT, {"loss": "x0"}),
    "sincos_text_x0head_x0loss": ({**SINCOS_TEXT, **X0[0]}, X0[1]),
    "sincos_text_dim96_x0": ({**SINCOS_TEXT, **DIM96, **X0[0]}, X0[1]),
    "sincos_text_dim128_x0": ({**SINCOS_TEXT, **DIM128, **X0[0]}, X0[1]),
}  # fmt: skip

# Distillation variants: train.py overrides on configs/world/dmd.yaml (ROOT: the chain's run root), on
# top of DISTILL_PINNED: the config's settings as they were when these variants were run (the config
# exits every block at the last step since `dmd_ratio10_lr5e-5_last_step_only` and its seeds won), so
# every row of the README's tables reproduces.
DISTILL_PINNED = ("last_step_only=false",)
TEACHER_FORCING = (  # the chain's teacher-forcing baseline stage, as overrides on dmd.yaml
    *DMD_CRITIC_KEEPS_UP,
    "trainer=causvid",
    "teacher_forcing=true",
    "data_path={root}/data/clips",
)
DISTILL_VARIANTS: dict[str, list[str]] = {
    "dmd_ref": [],
    "dmd_critic_from_base": ["fake_score_ckpt={root}/base/export/generator"],  # shipped before
    "dmd_real_score_is_base": [
        "real_score_model={{_component_: world.network.wan_config}}",  # braces doubled: str.format
        "real_score_ckpt={root}/base/export/generator",
    ],
    "dmd_ratio10": ["dfake_gen_update_ratio=10"],
    "dmd_lr5e-5": ["lr=5e-5"],
    "dmd_ratio10_lr5e-5": list(DMD_CRITIC_KEEPS_UP),  # both ways to let the critic keep up (full profile)
    "dmd_lr_critic1e-3": ["lr_critic=1e-3"],
    "dmd_min_score_t200": ["min_score_timestep=200"],
    "dmd_seed4": ["seed=4"],  # the shipped recipe on another seed: how much of a result is the draw
    "dmd_ratio10_lr5e-5_seed4": [*DMD_CRITIC_KEEPS_UP, "seed=4"],
    # Why Self-Forcing DMD loses coherence to teacher forcing on every seed (README): more generator
    # updates (at --steps 1600 the ratio-10 runs get the 160 of the shipped ratio-5 ones), a generator EMA
    # (its weights judged too), a bigger batch; the DMD baselines on the same config and budget
    # (`configs/world/dmd_teacher_forcing.yaml` / `dmd_diffusion_forcing.yaml` differ from dmd.yaml only
    # in `trainer`, `teacher_forcing` and `data_path`).
    "dmd_ratio10_lr5e-5_ema0.95": [*DMD_CRITIC_KEEPS_UP, "ema_weight=0.95", "ema_start_step=200"],
    "dmd_ratio10_lr5e-5_batch16": [*DMD_CRITIC_KEEPS_UP, "batch_size=16"],
    # the exit step: one shared draw per rollout (upstream's default) trains one of the 4 steps per
    # generator update, where teacher/diffusion forcing draw a step per chunk and sample; a draw per
    # block; only the last step (the one whose output inference keeps)
    "dmd_ratio10_lr5e-5_exit_per_block": [*DMD_CRITIC_KEEPS_UP, "same_step_across_blocks=false"],
    "dmd_ratio10_lr5e-5_last_step_only": [*DMD_CRITIC_KEEPS_UP, "last_step_only=true"],
    "dmd_ratio10_lr5e-5_last_step_only_seed4": [*DMD_CRITIC_KEEPS_UP, "last_step_only=true", "seed=4"],
    "dmd_ratio10_lr5e-5_last_step_only_seed5": [*DMD_CRITIC_KEEPS_UP, "last_step_only=true", "seed=5"],
    "dmd_last_step_only": ["last_step_only=true"],  # the shipped ratio 5 / LR 1e-4: 160 generator updates
    "dmd_ratio10_lr5e-5_last_step_only_ema0.95": [
        *DMD_CRITIC_KEEPS_UP,
        "last_step_only=true",
        "ema_weight=0.95",
        "ema_start_step=200",
    ],
    # the score / critic timestep draw: shift 5 (as the students' schedule) puts 56% of the draws above
    # t = 800 and 5% below 200, where edges are decided; shift 1 draws t uniformly
    "dmd_ratio10_lr5e-5_score_shift1": [*DMD_CRITIC_KEEPS_UP, "timestep_shift=1.0"],
    "tf_ratio10_lr5e-5_score_shift1": [*TEACHER_FORCING, "timestep_shift=1.0"],
    "tf_ratio10_lr5e-5": list(TEACHER_FORCING),
    "tf_ratio10_lr5e-5_seed4": [*TEACHER_FORCING, "seed=4"],
    "tf_ratio10_lr5e-5_seed5": [*TEACHER_FORCING, "seed=5"],
    "df_ratio10_lr5e-5": [*DMD_CRITIC_KEEPS_UP, "trainer=causvid", "data_path={root}/data/clips"],
    # SiD on the same config (`configs/world/sid.yaml` differs from dmd.yaml only in `trainer`)
    "sid_ref": ["trainer=sid"],
    "sid_critic_from_base": ["trainer=sid", "fake_score_ckpt={root}/base/export/generator"],
    "sid_alpha1.2": ["trainer=sid", "sid_alpha=1.2"],  # the SiD paper's alpha (upstream: 1.0)
}

TRAIN_DEFAULTS = {"lr": 2e-3, "warmup": 0, "decay": "constant", "batch": 32, "pos_init_std": None, "seed": 1,
                  "loss": "flow"}  # fmt: skip
FRAMES = 12
X0_TIMESTEPS = (200, 500, 800)
STUDENT_STEPS = (1000, 750, 500, 250)  # the students' schedule (configs/world/dmd.yaml), warped by the shift
SHIFT = 5.0


def lr_factor(step: int, steps: int, warmup: int, decay: str) -> float:
    """Linear warm-up over `warmup` steps, then constant or cosine decay to 0 at `steps`."""
    factor = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if decay == "cosine":
        factor *= 0.5 * (1.0 + math.cos(math.pi * step / steps))
    elif decay != "constant":
        raise ValueError(f"decay must be constant or cosine, got {decay!r}")
    return factor


def run_variant(name: str, steps: int, eval_samples: int) -> dict:
    """Train one variant in this process and judge it; returns the result row."""
    from model.teacher_regression import TeacherRegression
    from pipeline import CausalInferencePipeline
    from utils.scheduler import FlowMatchScheduler
    from wan import CausalWanModel, WanDiffusionWrapper

    from .codec import WorldCodec
    from .evaluate import evaluate
    from .network import NETWORK
    from .render import render_prompt, split_prompts
    from .sampling import bidirectional_copy, few_step_samples, ode_samples, x0_rmse
    from .teacher import ExactTeacher
    from .text import WorldTextEncoder

    net_changes, train_changes = VARIANTS[name]
    opts = {**TRAIN_DEFAULTS, **train_changes}
    torch.manual_seed(opts["seed"])
    cfg = NETWORK.replace(**{**BEFORE, **net_changes})
    model = CausalWanModel(cfg, num_frame_per_block=FRAMES)  # one block: bidirectional, as the chain's base
    if opts["pos_init_std"] is not None:
        with torch.no_grad():
            for table in model.pos_embedding.parameters():
                table.normal_(std=opts["pos_init_std"])
    scheduler = FlowMatchScheduler(shift=SHIFT)
    wrapper = WanDiffusionWrapper(model, scheduler)
    text = WorldTextEncoder(cfg.text_dim, cfg.text_len)
    objective = TeacherRegression(
        wrapper, ExactTeacher(text), scheduler, num_frame_per_block=FRAMES, denoising_loss_type=opts["loss"]
    )

    train, heldout = split_prompts()
    clips = torch.stack([render_prompt(q, FRAMES) for q in train]).flatten(0, 1)
    latents = WorldCodec().encode(clips.transpose(1, 2))
    embeds = text([q.text for q in train])["prompt_embeds"].repeat_interleave(clips.shape[0] // len(train), 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts["lr"], weight_decay=0.0)
    g = torch.Generator().manual_seed(opts["seed"])
    times, losses = [], []
    start = time.perf_counter()
    for step in range(steps):
        tic = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = opts["lr"] * lr_factor(step, steps, opts["warmup"], opts["decay"])
        rows = torch.randint(0, latents.shape[0], (opts["batch"],), generator=g)
        loss, _ = objective.generator_loss({"clean_latent": latents[rows], "prompt_embeds": embeds[rows]}, {})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - tic)
        losses.append(loss.item())
        if step % 500 == 0:
            print(
                f"[{name}] step {step} loss {sum(losses[-100:]) / len(losses[-100:]):.4f}",
                file=sys.stderr,
                flush=True,
            )
    train_seconds = time.perf_counter() - start

    model.eval()
    steps4 = [float(t) for t in scheduler.warp(list(STUDENT_STEPS))]
    bidirectional = bidirectional_copy(wrapper)
    row = {
        "name": name, "steps": steps, "params": sum(p.numel() for p in model.parameters()),
        "step_seconds": sorted(times)[len(times) // 2], "train_seconds": train_seconds,
        "final_loss": sum(losses[-100:]) / min(100, len(losses)), "net": net_changes, "train": opts,
    }  # fmt: skip
    for split, prompts in (("heldout", heldout), ("train", train[:10])):
        asked = [q for q in prompts for _ in range(eval_samples)]
        pipe = CausalInferencePipeline(wrapper, wrapper.scheduler, steps4, FRAMES, vae=WorldCodec())
        four = few_step_samples(pipe, asked, FRAMES)
        ode = ode_samples(bidirectional, SHIFT, asked, FRAMES, 40)
        row[f"{split}_4step"] = evaluate(four, asked).summary()
        row[f"{split}_ode40"] = evaluate(ode, asked).summary()
    row["x0_rmse"] = x0_rmse(bidirectional, heldout, FRAMES, X0_TIMESTEPS)
    return row


def distill_overrides(name: str, root: Path) -> list[str]:
    """The train.py overrides of distillation variant `name` (after DISTILL_PINNED; the later wins)."""
    return [o.format(root=root) for o in (*DISTILL_PINNED, *DISTILL_VARIANTS[name])]


WORLD_ROLES = ("generator_model", "real_score_model", "fake_score_model")


def chain_world(root: Path) -> dict[str, dict]:
    """The world the chain under `root` trained in: the settings its ODE init's config gives the networks
    and the exact teacher beyond their component (`WORLD_ROLES`; the random-start world's, a
    `world_chain.py --network` change). A variant run without them would train a network of another
    shape, or against the other world's teacher, from that init."""
    import yaml

    saved = yaml.safe_load((root / "ode" / "config.yaml").read_text(encoding="utf-8")) or {}
    sections = {role: saved.get(role) if isinstance(saved.get(role), dict) else {} for role in WORLD_ROLES}
    return {
        role: {k: v for k, v in section.items() if k != "_component_"} for role, section in sections.items()
    }


def distill_command(name: str, root: Path, run: Path, steps: int) -> tuple[list[str], list[str], bool]:
    """train.py's command line for variant `name` from the chain under `root` (its world's settings, then
    the variant's overrides: the later wins), the variant's overrides, and whether the world starts
    objects anywhere along their path."""
    repo = Path(__file__).resolve().parents[1]
    world = chain_world(root)
    random_start = bool(world["real_score_model"].get("random_start", False))
    overrides = distill_overrides(name, root)
    replaced = {o.partition("=")[0] for o in overrides} & set(WORLD_ROLES)
    # a variant that replaces a role replaces it by a world network (`dmd_real_score_is_base`): after the
    # replacement it gets the generator's settings, the shape of the checkpoint it loads
    world.update({role: world["generator_model"] for role in replaced})
    before = [
        f"{r}.{k}={json.dumps(v)}" for r in WORLD_ROLES if r not in replaced for k, v in world[r].items()
    ]
    after = [f"{r}.{k}={json.dumps(v)}" for r in sorted(replaced) for k, v in world[r].items()]
    cmd = [sys.executable, str(repo / "train.py"), "--config", str(repo / "configs" / "world" / "dmd.yaml"),
           "--logdir", str(run), f"data_path={root}/data/train_prompts.txt",
           f"generator_ckpt={root}/ode/export/generator", f"fake_score_ckpt={root}/ode/export/generator",
           f"max_steps={steps}", f"log_iters={steps}", *before, *overrides, *after]  # fmt: skip
    return cmd, overrides, random_start


def run_distill_variant(name: str, root: Path, out: Path, steps: int, eval_samples: int) -> dict:
    """One DMD run through train.py from the chain under `root`, judged on held-out prompts at 12 frames."""
    from utils.config import ema_rates

    from .evaluate import evaluate
    from .render import split_prompts
    from .sampling import generate, load_run_config

    repo = Path(__file__).resolve().parents[1]
    run = out / f"{name}@{steps}"  # a variant at another step count is another run, not a resume
    cmd, overrides, random_start = distill_command(name, root, run, steps)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    seconds = time.perf_counter() - start
    _, heldout = split_prompts()
    asked = [q for q in heldout for _ in range(eval_samples)]
    row = {"name": name, "steps": steps, "overrides": overrides, "train_seconds": seconds,
           "random_start": random_start}  # fmt: skip
    # the generator's weights, and its EMA's when the run keeps one (the same noise draws)
    entries = {"heldout": "generator"}
    if ema_rates(load_run_config(run / "config.yaml")):
        entries["heldout_ema"] = "ema"
    for key, entry in entries.items():
        videos = generate(run, run / "config.yaml", asked, FRAMES, entry=entry)
        row[key] = evaluate(videos, asked, random_start=random_start).summary()
    return row


def format_distill_rows(rows: list[dict]) -> str:
    from .stats import with_interval

    keys = ("all_attributes", "coherence", "frame_coherence", "precision", "shade_tv")
    lines = ["| variant | steps | " + " | ".join(keys) + " | shades |", "|---" * (len(keys) + 3) + "|"]
    for r in rows:
        name = f"{r['name']} (random starts)" if r.get("random_start") else r["name"]
        for key, label in (("heldout", name), ("heldout_ema", f"{name} (EMA)")):
            if key not in r:
                continue
            s = r[key]
            cells = [with_interval(s, k) for k in keys]
            shades = "/".join(str(c) for c in s["shade_counts"])
            lines.append(f"| {label} | {r['steps']} | " + " | ".join(cells) + f" | {shades} |")
    return "\n".join(lines)


def format_rows(rows: list[dict]) -> str:
    head = (
        "| variant | params | steps | s/step | held-out 4-step: all / dir / shape / coh | held-out 40-step ODE: "
        "all / coh / frame coh | train 4-step all | x0 RMSE t=200/500/800 |"
    )
    lines = [head, "|---" * 8 + "|"]
    for r in rows:
        h4, h40, t4, x0 = r["heldout_4step"], r["heldout_ode40"], r["train_4step"], r["x0_rmse"]
        lines.append(
            f"| {r['name']} | {r['params'] / 1e3:.0f}k | {r['steps']} | {r['step_seconds']:.2f} | "
            f"{h4['all_attributes']:.2f} / {h4['direction']:.2f} / {h4['shape']:.2f} / {h4['coherence']:.2f} | "
            f"{h40['all_attributes']:.2f} / {h40['coherence']:.2f} / {h40['frame_coherence']:.2f} | "
            f"{t4['all_attributes']:.2f} | {x0['200']:.3f} / {x0['500']:.3f} / {x0['800']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="*", default=[], help="names from --list")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval_samples", type=int, default=8, help="samples per evaluated prompt")
    parser.add_argument("--jobs", type=int, default=2, help="variants trained at once (one thread each)")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--table", action="store_true", help="print the table of --results and stop")
    parser.add_argument("--list", action="store_true", help="list the variants and stop")
    parser.add_argument(
        "--distill",
        type=Path,
        default=None,
        metavar="ROOT",
        help="sweep DMD variants from the finished chain under ROOT instead of base variants",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # worker: run this variant, print its JSON row
    args = parser.parse_args(argv)
    if args.distill is not None:
        return distill_main(args)

    if args.list:
        for name, (net, train) in VARIANTS.items():
            print(f"{name}: network {net}, training {train}")
        return 0
    if args.one:
        torch.set_num_threads(1)
        print("RESULT " + json.dumps(run_variant(args.one, args.steps, args.eval_samples)), flush=True)
        return 0
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        print(f"error: unknown variants {unknown}; choose from {sorted(VARIANTS)}", file=sys.stderr)
        return 2
    args.results.parent.mkdir(parents=True, exist_ok=True)
    pending = list(args.variants)
    running: list[tuple[str, subprocess.Popen]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            cmd = [sys.executable, "-m", "world.sweep", "--one", name, "--steps", str(args.steps),
                   "--eval_samples", str(args.eval_samples)]  # fmt: skip
            running.append((name, subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)))
        time.sleep(2.0)
        for name, proc in list(running):
            if proc.poll() is None:
                continue
            running.remove((name, proc))
            out = proc.stdout.read() if proc.stdout else ""
            result = [line[7:] for line in out.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not result:
                print(f"[{name}] failed (exit {proc.returncode})", file=sys.stderr)
                continue
            with open(args.results, "a", encoding="utf-8") as f:
                f.write(result[0] + "\n")
            print(f"[{name}] done", flush=True)
    if args.results.is_file():
        rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
        print(format_rows(rows))
    return 0


def distill_main(args: argparse.Namespace) -> int:
    """`--distill ROOT`: DMD variants one after another (each train.py run uses both cores)."""
    results = args.results if args.results != DEFAULT_RESULTS else DEFAULT_RESULTS.with_name("distill.jsonl")
    if args.list:
        for name, overrides in DISTILL_VARIANTS.items():
            print(f"{name}: {overrides}")
        return 0
    unknown = [v for v in args.variants if v not in DISTILL_VARIANTS]
    if unknown:
        print(f"error: unknown variants {unknown}; choose from {sorted(DISTILL_VARIANTS)}", file=sys.stderr)
        return 2
    missing = [
        p for p in ("ode/export/generator", "base/export/generator") if not (args.distill / p).exists()
    ]
    if missing:
        print(f"error: {args.distill} is not a finished chain (missing {missing})", file=sys.stderr)
        return 2
    results.parent.mkdir(parents=True, exist_ok=True)
    for name in [] if args.table else args.variants:
        row = run_distill_variant(
            name, args.distill, results.parent / "distill", args.steps, args.eval_samples
        )
        with open(results, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    if results.is_file():
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        print(format_distill_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
