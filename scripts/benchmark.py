"""Time the Wan DiT, the causal rollout and the training steps on one geometry, with random weights.

    python scripts/benchmark.py --geometry large                       # CPU, a few minutes on 2 cores
    python scripts/benchmark.py --geometry large --json new.json --compare old.json
    python scripts/benchmark.py --geometry wan2.1-t2v-1.3b --dtype bf16              # on a GPU
    python scripts/benchmark.py --geometry wan2.1-t2v-1.3b --frames 3 --latent 30 52  # CPU smoke run
    python scripts/benchmark.py --config configs/world/base.yaml data_path=runs/world/data/clips --threads 1
    python scripts/benchmark.py --geometry large --sp 2                # sequence parallel, 2 processes
    torchrun --nproc_per_node 8 scripts/benchmark.py --geometry wan2.1-t2v-1.3b --dtype bf16 --sp 8  # 8 GPUs

With `--config` (any training config, `key=value` overrides after it) it times train.py's real step
against a bare PyTorch loop over the same networks and prints both medians and their ratio (see
scripts/_step_benchmark.py); `--warmup` / `--repeats` count cycles of `dfake_gen_update_ratio` steps.

Rows (each: median, min and max seconds over `--repeats` runs after `--warmup` runs):
  bidirectional_forward  the teacher/critic `WanModel` on all frames, no grad
  rollout_video          `CausalInferencePipeline` over the whole video, DiT only (K steps per block and
                         a cache refresh between blocks)
  rollout_block          the same, per block as streamed (one block's K steps plus the refresh before it)
  train_fwd_bwd          the causal training path (block mask) forward + backward over all frames
  train_fwd_bwd_ckpt     the same with gradient checkpointing
  dmd_step               one DMD optimizer step of the generator and one of the critic, the shipped
                         recipe (configs/self_forcing_dmd.yaml: CFG teacher, checkpointing, AdamW)
  critic_step            one critic-only step (the other dfake_gen_update_ratio - 1 steps of a cycle)
  dmd_step_avg           derived: (dmd_step + (ratio - 1) * critic_step) / ratio, the mean step time

A row whose weights, gradients and AdamW states alone would not fit in free memory is reported as
skipped (the 1.3B DMD rows on a CPU machine); the 1.3B on CPU defaults to one timed repeat.
The training steps roll out every block to its last denoising step (the costliest exit draw) so that
repeats do the same work. The teacher has the generator's geometry (the shipped one is the 14B).

FLOPs are counted in each row's first warm-up run with `torch.utils.flop_counter.FlopCounterMode` (plus
the CPU flash SDPA kernels it does not know), so recomputation under checkpointing counts as work done. GFLOP/s is
FLOPs / median time; "peak" is the best of a square matmul measured here with the same threads/dtype.

Peak memory: on CUDA `max_memory_allocated` over the timed repeats; on CPU the peak resident set size
(VmHWM, reset through /proc/self/clear_refs after the warm-up). On CPU every row runs in a fresh
subprocess by default (`--no-isolate` to turn off), so heap that an earlier row freed but the
allocator kept does not count against a later row. `base` is the memory held when the row starts
(weights, inputs, caches, and the interpreter on CPU).

Sequence parallelism (`--sp N`): every DiT splits its tokens over N processes (Ulysses, `sp_size`);
without torchrun the script starts them itself (`torch.distributed.run`, one launch per row when
isolated). Times are rank 0's (the all-to-alls keep the ranks in step), FLOPs and GFLOP/s are per rank,
and peak/base memory are the largest over the ranks, each rank's peak listed in the note. As at
`--sp 1`, nothing reduces gradients between ranks (no FSDP here): the rows time the DiT work and its
all-to-alls.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from model.build import build_objective_from_config, step_list
from pipeline import CausalInferencePipeline
from utils.config import load_config
from utils.optim import build_optimizer, clip_grad_norm
from utils.scheduler import FlowMatchScheduler
from wan import CausalWanModel, WanConfig, WanDiffusionWrapper, WanModel
from wan.attention import describe_backends

ROWS = (
    "bidirectional_forward",
    "rollout_video",
    "rollout_block",
    "train_fwd_bwd",
    "train_fwd_bwd_ckpt",
    "dmd_step",
    "critic_step",
)
DERIVED = ("dmd_step_avg",)
RECIPE = Path(__file__).resolve().parent.parent / "configs" / "self_forcing_dmd.yaml"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Geometry:
    """Network sizes and the video the rows run on (latents `[1, frames, in_dim, *latent_hw]`)."""

    name: str
    wan: WanConfig
    frames: int
    latent_hw: tuple[int, int]
    num_frame_per_block: int = 3

    @property
    def tokens(self) -> int:
        return self.frames // self.wan.patch_size[0] * self.wan.tokens_per_frame(*self.latent_hw)


GEOMETRIES = {
    "tiny": Geometry("tiny", WanConfig.preset("tiny"), 6, (8, 8)),
    # Wan's text geometry (512 x 4096 context) with a small trunk: 21 frames x 64 tokens = 1344 tokens.
    "large": Geometry(
        "large", WanConfig().replace(dim=256, ffn_dim=1024, num_heads=8, num_layers=4), 21, (16, 16)
    ),
    # The real 1.3B at 480x832: 21 frames x 1560 tokens = 32760 tokens.
    "wan2.1-t2v-1.3b": Geometry("wan2.1-t2v-1.3b", WanConfig.preset("wan2.1-t2v-1.3b"), 21, (60, 104)),
}


def geometry_from_args(args: argparse.Namespace) -> Geometry:
    base = GEOMETRIES[args.geometry]
    frames = args.frames or base.frames
    hw = tuple(args.latent) if args.latent else base.latent_hw
    if frames % base.num_frame_per_block:
        raise SystemExit(
            f"--frames {frames} must be a multiple of num_frame_per_block={base.num_frame_per_block}"
        )
    base.wan.tokens_per_frame(*hw)  # raises on a latent size the patch does not divide
    return Geometry(base.name, base.wan, frames, hw, base.num_frame_per_block)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak(device: torch.device) -> float:
    """Start a new peak-memory window; return the memory held now (MiB)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:  # Linux >= 4.0: writing 5 resets the VmHWM high-water mark to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _rss_now_mb()
    except OSError:
        return float("nan")


def _peak(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # lifetime peak (KiB on Linux)


def _flops_mapping() -> dict:
    """FLOP formulas for the CPU flash SDPA kernels, which FlopCounterMode does not register."""
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):

        def fwd(query, key, value, *args, out_val=None, **kwargs) -> int:
            return sdpa_flop_count(query, key, value)

        def bwd(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
            return sdpa_backward_flop_count(grad_out, query, key, value)

        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return mapping


def count_flops(fn: Callable[[], Any]) -> int:
    counter = FlopCounterMode(display=False, custom_mapping=_flops_mapping())
    with counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> dict[str, float]:
    """Best GFLOP/s of an n^3 matmul (n = 2048 on CPU, 8192 on CUDA) in `dtype`."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    best = min(times[1:])
    return {"n": n, "gflops": 2 * n**3 / best / 1e9}


# ---------------------------------------------------------------------------------------------- rows


@dataclass
class Bench:
    """One row: `run()` does the work once; it returns per-item seconds (e.g. per block) or None."""

    run: Callable[[], list[float] | None]
    note: str
    items_per_run: int = 1


def _randomise_head(model: torch.nn.Module) -> None:
    # Wan zero-initialises the output head, so a fresh model predicts v = 0; give it random weights so
    # the rollout moves like a trained model's would (timings do not depend on it, numerics might).
    torch.nn.init.normal_(model.head.head.weight, std=0.02)


# The sequence-parallel group of this process (`--sp N` under torchrun), given to every DiT built.
SP_COMM: list = [None]


def _causal(geom: Geometry, dtype: torch.dtype, device: torch.device) -> WanDiffusionWrapper:
    with torch.device(device):
        model = CausalWanModel(geom.wan, num_frame_per_block=geom.num_frame_per_block)
    _randomise_head(model)
    model.enable_sequence_parallel(SP_COMM[0])
    return WanDiffusionWrapper(model.to(dtype), FlowMatchScheduler(shift=5.0))


def _bidirectional(geom: Geometry, dtype: torch.dtype, device: torch.device) -> WanDiffusionWrapper:
    with torch.device(device):
        model = WanModel(geom.wan)
    _randomise_head(model)
    model.enable_sequence_parallel(SP_COMM[0])
    return WanDiffusionWrapper(model.to(dtype), FlowMatchScheduler(shift=5.0))


def _recipe(geom: Geometry):
    c = geom.wan
    shape = [1, geom.frames, c.in_dim, *geom.latent_hw]
    return load_config(
        RECIPE,
        [f"image_or_video_shape={shape}", f"num_training_frames={geom.frames}", "trainer=dmd"],
    )


def build_row(name: str, geom: Geometry, dtype: torch.dtype, device: torch.device) -> Bench:
    """Build the networks and inputs of row `name` (everything outside the timed region)."""
    cfg = _recipe(geom)
    c = geom.wan
    f, (h, w) = geom.frames, geom.latent_hw
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    context = randn(1, c.text_len, c.text_dim)
    steps = step_list(cfg)
    blocks = f // geom.num_frame_per_block
    k = len([s for s in steps if s > 0])
    rollout_calls = f"{blocks} blocks x {k} steps + {blocks - 1} refreshes"

    if name == "bidirectional_forward":
        net = _bidirectional(geom, dtype, device).eval()
        x = randn(1, f, c.in_dim, h, w)
        t = torch.full((1,), 500.0, device=device)

        @torch.no_grad()
        def run() -> None:
            net(x, t, context)

        return Bench(run, f"{geom.tokens} tokens, 1 call")

    if name in ("rollout_video", "rollout_block"):
        net = _causal(geom, dtype, device).eval()
        pipe = CausalInferencePipeline(
            net, FlowMatchScheduler(shift=5.0), steps, geom.num_frame_per_block, num_max_frames=f
        )
        noise = randn(1, f, c.in_dim, h, w)
        cond = {"prompt_embeds": context}
        if name == "rollout_video":

            def run() -> None:
                pipe.inference(noise, cond)

            return Bench(run, rollout_calls)

        def run_blocks() -> list[float]:
            return [out.latency_s for out in pipe.stream(noise, cond)]

        return Bench(run_blocks, f"{k} steps + 1 refresh, median over {blocks} blocks", items_per_run=blocks)

    if name in ("train_fwd_bwd", "train_fwd_bwd_ckpt"):
        net = _causal(geom, dtype, device).train()
        net.model.enable_gradient_checkpointing(name.endswith("ckpt"))
        x = randn(1, f, c.in_dim, h, w)
        t = torch.full((1, f), 500.0, device=device)
        backend = describe_backends(device)["block_mask"]

        def run() -> None:
            net.zero_grad(set_to_none=True)
            flow, _ = net(x, t, context)
            flow.float().square().mean().backward()

        return Bench(run, f"{geom.tokens} tokens, block mask via {backend}")

    if name in ("dmd_step", "critic_step"):
        return _dmd_bench(
            name, cfg, geom, dtype, device, context, randn(1, c.text_len, c.text_dim), blocks, k
        )
    raise ValueError(f"unknown row {name!r}; one of {ROWS}")


def _dmd_bench(
    name: str,
    cfg,
    geom: Geometry,
    dtype,
    device,
    prompt: torch.Tensor,
    negative: torch.Tensor,
    blocks: int,
    k: int,
) -> Bench:
    generator = _causal(geom, dtype, device).train()
    real = _bidirectional(geom, dtype, device)
    critic = _bidirectional(geom, dtype, device).train()
    for net in (generator, critic):
        net.model.enable_gradient_checkpointing(cfg.gradient_checkpointing)
    objective = build_objective_from_config(cfg, generator, real, critic, None, dtype)
    optimizers = {
        "generator": build_optimizer(
            generator.parameters(), cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay
        ),
        "critic": build_optimizer(
            critic.parameters(), cfg.lr_critic, (cfg.beta1_critic, cfg.beta2_critic), cfg.weight_decay
        ),
    }
    clip = {"generator": cfg.max_grad_norm_generator, "critic": cfg.max_grad_norm_critic}
    batch = {"prompt_embeds": prompt, "negative_prompt_embeds": negative}
    shared = {"num_blocks": blocks, "exit_steps": [k - 1] * blocks}

    def step(role: str) -> None:
        module = generator if role == "generator" else critic
        optimizers[role].zero_grad(set_to_none=True)
        loss_fn = objective.generator_loss if role == "generator" else objective.critic_loss
        loss, _ = loss_fn(batch, shared)
        loss.backward()
        clip_grad_norm(module, clip[role])
        optimizers[role].step()

    if name == "dmd_step":

        def run() -> None:
            step("generator")
            step("critic")

        return Bench(run, f"generator + critic, CFG {cfg.guidance_scale}, ckpt {cfg.gradient_checkpointing}")

    def run_critic() -> None:
        step("critic")

    return Bench(run_critic, f"one in {cfg.dfake_gen_update_ratio} steps also trains the generator")


# Copies of the weights each row holds: networks, gradients and AdamW's two moments (dmd_step builds
# generator, teacher and critic; critic_step never creates the generator's gradients or moments).
WEIGHT_COPIES = {
    "bidirectional_forward": 1,
    "rollout_video": 1,
    "rollout_block": 1,
    "train_fwd_bwd": 2,
    "train_fwd_bwd_ckpt": 2,
    "dmd_step": 9,
    "critic_step": 6,
}


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def memory_check(name: str, geom: Geometry, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why row `name` cannot fit here (weights, gradients and optimizer states alone), or None."""
    with torch.device("meta"):
        params = sum(p.numel() for p in WanModel(geom.wan).parameters())
    need = WEIGHT_COPIES[name] * params * torch.finfo(dtype).bits // 8
    have = _available_bytes(device)
    if need > 0.9 * have:
        return f"skipped: needs {need / 2**30:.1f} GiB of weights/grads/AdamW states, {have / 2**30:.1f} GiB free"
    return None


def measure_row(name: str, geom: Geometry, dtype, device, warmup: int, repeats: int) -> dict[str, Any]:
    """Build row `name`, count its FLOPs in the first warm-up run, then time `repeats` runs."""
    skipped = memory_check(name, geom, dtype, device)
    if skipped:
        return {"row": name, "skipped": skipped}
    torch.manual_seed(0)
    bench = build_row(name, geom, dtype, device)
    try:
        flops = count_flops(bench.run) / bench.items_per_run
    except Exception as err:  # noqa: BLE001 - e.g. a compiled kernel the counter cannot trace: time anyway
        print(f"{name}: FLOPs not counted ({type(err).__name__}: {err})", file=sys.stderr)
        flops = float("nan")
        bench.run()
    for _ in range(warmup - 1):
        bench.run()
    _sync(device)
    base = _reset_peak(device)
    times: list[float] = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        items = bench.run()
        _sync(device)
        times.append(time.perf_counter() - start) if items is None else times.extend(items)
    med = statistics.median(times)
    result = {
        "row": name,
        "median_s": med,
        "min_s": min(times),
        "max_s": max(times),
        "samples": len(times),
        "gflop": flops / 1e9,
        "gflops": flops / med / 1e9,
        "peak_mem_mb": _peak(device),
        "base_mem_mb": base,
        "note": bench.note,
    }
    return _across_ranks(result) if SP_COMM[0] is not None else result


def _across_ranks(result: dict[str, Any]) -> dict[str, Any]:
    """Sequence parallel: rank 0's times and FLOPs, the largest peak/base memory, every rank's peak."""
    import torch.distributed as dist

    mems: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(mems, (result["peak_mem_mb"], result["base_mem_mb"]))
    peaks = [p for p, _ in mems]
    result["peak_mem_mb"], result["base_mem_mb"] = max(peaks), max(b for _, b in mems)
    result["peak_mem_mb_per_rank"] = peaks
    result["note"] += f"; per-rank peak MiB {'/'.join(f'{p:.0f}' for p in peaks)}"
    return result


def derived_rows(rows: list[dict[str, Any]], ratio: int) -> list[dict[str, Any]]:
    by = {r["row"]: r for r in rows if "skipped" not in r}
    if "dmd_step" not in by or "critic_step" not in by:
        return []
    d, c = by["dmd_step"], by["critic_step"]
    med = (d["median_s"] + (ratio - 1) * c["median_s"]) / ratio
    gflop = (d["gflop"] + (ratio - 1) * c["gflop"]) / ratio
    return [
        {
            "row": "dmd_step_avg",
            "median_s": med,
            "min_s": (d["min_s"] + (ratio - 1) * c["min_s"]) / ratio,
            "max_s": (d["max_s"] + (ratio - 1) * c["max_s"]) / ratio,
            "samples": 0,
            "gflop": gflop,
            "gflops": gflop / med,
            "peak_mem_mb": max(d["peak_mem_mb"], c["peak_mem_mb"]),
            "base_mem_mb": max(d["base_mem_mb"], c["base_mem_mb"]),
            "note": f"mean step at dfake_gen_update_ratio={ratio}",
        }
    ]


# ---------------------------------------------------------------------------------------------- output


def header(args: argparse.Namespace, geom: Geometry, device: torch.device, peak: dict) -> dict[str, Any]:
    c = geom.wan
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {
        "geometry": geom.name,
        "dim": c.dim,
        "ffn_dim": c.ffn_dim,
        "num_heads": c.num_heads,
        "num_layers": c.num_layers,
        "text_len": c.text_len,
        "text_dim": c.text_dim,
        "frames": geom.frames,
        "latent_hw": list(geom.latent_hw),
        "tokens": geom.tokens,
        "num_frame_per_block": geom.num_frame_per_block,
        "device": f"{device.type} ({name})",
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "backends": describe_backends(device),
        "matmul_peak_gflops": peak["gflops"],
        "matmul_peak_n": peak["n"],
        "warmup": args.warmup,
        "repeats": args.repeats,
        "isolated_rows": args.isolate,
        "sp": args.sp,
    }


def print_table(meta: dict[str, Any], rows: list[dict[str, Any]], old: dict[str, Any] | None = None) -> None:
    b = meta["backends"]
    print(
        f"geometry={meta['geometry']} dim={meta['dim']} ffn={meta['ffn_dim']} heads={meta['num_heads']} "
        f"layers={meta['num_layers']} frames={meta['frames']} latent={meta['latent_hw'][0]}x"
        f"{meta['latent_hw'][1]} tokens={meta['tokens']} text={meta['text_len']}x{meta['text_dim']}"
        + (f" sp={meta['sp']} (GFLOP per rank, peak MiB the largest rank's)" if meta.get("sp", 1) > 1 else "")
    )
    print(
        f"device={meta['device']} dtype={meta['dtype']} threads={meta['threads']} torch={meta['torch']} "
        f"attention={b['attention']} block_mask={b['block_mask']} "
        f"matmul peak={meta['matmul_peak_gflops']:.0f} GFLOP/s (n={meta['matmul_peak_n']})"
    )
    peak = meta["matmul_peak_gflops"]
    old_rows = {r["row"]: r for r in old["rows"]} if old else {}
    cols = f"{'row':<22}{'median ms':>11}{'min':>9}{'max':>9}{'GFLOP':>9}{'GFLOP/s':>9}{'%peak':>7}{'peak MiB':>10}"
    cols += f"{'base MiB':>10}" + (f"{'old ms':>10}{'speedup':>9}{'old MiB':>9}" if old else "") + "  note"
    print(cols)
    for r in rows:
        if "skipped" in r:
            print(f"{r['row']:<22}{r['skipped']}")
            continue
        line = (
            f"{r['row']:<22}{r['median_s'] * 1e3:>11.1f}{r['min_s'] * 1e3:>9.1f}{r['max_s'] * 1e3:>9.1f}"
            f"{r['gflop']:>9.2f}{r['gflops']:>9.1f}{100 * r['gflops'] / peak:>6.0f}%"
            f"{r['peak_mem_mb']:>10.0f}{r['base_mem_mb']:>10.0f}"
        )
        if old:
            o = old_rows.get(r["row"])
            line += (
                f"{o['median_s'] * 1e3:>10.1f}{o['median_s'] / r['median_s']:>8.2f}x{o['peak_mem_mb']:>9.0f}"
                if o and "skipped" not in o
                else f"{'-':>10}{'-':>9}{'-':>9}"
            )
        print(line + f"  {r['note']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--geometry", choices=sorted(GEOMETRIES), default="large")
    p.add_argument("--frames", type=int, default=None, help="latent frames (default: the geometry's)")
    p.add_argument(
        "--latent", type=int, nargs=2, default=None, metavar=("H", "W"), help="latent height, width"
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per row; the first counts FLOPs")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs (default 5; 1 for the 1.3B on CPU; 10 with --config)",
    )
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--json", type=Path, default=None, help="write the header and rows here")
    p.add_argument(
        "--compare", type=Path, default=None, help="a JSON written earlier: add old/speedup columns"
    )
    p.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run each row in a fresh subprocess (default: on for CPU, where peak RSS needs it)",
    )
    p.add_argument(
        "--sp", type=int, default=1, help="sequence-parallel processes per DiT (torchrun or started here)"
    )
    p.add_argument(
        "--config", type=Path, default=None, help="a training config: trainer step vs bare loop (no rows)"
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides of --config")
    p.add_argument("--_child_out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_intermixed_args(argv)
    if args.overrides and args.config is None:
        p.error(f"key=value overrides {args.overrides} need --config")
    rows = [r for r in args.rows.split(",") if r]
    bad = [r for r in rows if r not in ROWS]
    if bad:
        p.error(f"unknown row(s) {bad}; choose from {','.join(ROWS)}")
    args.rows = rows
    heads = GEOMETRIES[args.geometry].wan.num_heads
    if args.sp < 1 or heads % args.sp:
        p.error(f"--sp {args.sp} must be >= 1 and divide the geometry's {heads} heads")
    if args.isolate is None:
        args.isolate = torch.device(args.device).type == "cpu"
    big_on_cpu = args.geometry == "wan2.1-t2v-1.3b" and torch.device(args.device).type == "cpu"
    if args.repeats is None:
        args.repeats = 10 if args.config else 1 if big_on_cpu else 5
    if args.repeats < 1 or args.warmup < 1:
        p.error("--repeats and --warmup must be >= 1 (the first warm-up run counts FLOPs)")
    return args


def _launcher(sp: int) -> list[str]:
    """The interpreter command that runs this script: `sp` processes under torchrun when sp > 1."""
    if sp == 1:
        return [sys.executable, str(Path(__file__).resolve())]
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(sp)]
    return [*run, "--master_addr", "127.0.0.1", "--master_port", str(port), str(Path(__file__).resolve())]


def _run_isolated(row: str, argv: list[str], sp: int) -> dict[str, Any]:
    """Run one row in a fresh interpreter (`sp` of them under torchrun) and return its result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [*_launcher(sp), *argv, "--rows", row, "--no-isolate"]
        subprocess.run([*cmd, "--_child_out", str(out)], check=True)
        return json.loads(out.read_text())


def _join_sp_group(sp: int) -> torch.device | None:
    """Under torchrun: one sequence-parallel group of all `sp` processes; returns this rank's device."""
    from utils.distributed import init_distributed
    from utils.sequence_parallel import init_sequence_parallel

    info = init_distributed()
    if info.world_size != sp:
        raise SystemExit(f"--sp {sp} needs exactly {sp} processes, torchrun started {info.world_size}")
    SP_COMM[0] = init_sequence_parallel(sp, info).comm
    return info.device


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        return _main(args, argv)
    finally:
        if SP_COMM[0] is not None:  # leave the process group cleanly (gloo aborts at exit otherwise)
            from utils.distributed import cleanup

            SP_COMM[0] = None
            cleanup()


def _main(args: argparse.Namespace, argv: list[str]) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    if args.config is not None:
        from scripts._step_benchmark import main as step_benchmark

        result = step_benchmark(args.config, args.overrides, args.warmup, args.repeats, args.json)
        return [{"row": name, **row} for name, row in result["rows"].items()]
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    geom = geometry_from_args(args)
    launched = "WORLD_SIZE" in os.environ
    if args.sp > 1 and not launched and not args.isolate:  # the whole table under torchrun
        subprocess.run([*_launcher(args.sp), *argv], check=True)
        return json.loads(args.json.read_text())["rows"] if args.json else []
    if args.sp > 1 and launched:
        device = _join_sp_group(args.sp)
    rank0 = not launched or int(os.environ["RANK"]) == 0
    if args._child_out is not None:  # one isolated row: measure, write, no table
        result = measure_row(args.rows[0], geom, dtype, device, args.warmup, args.repeats)
        if rank0:
            args._child_out.write_text(json.dumps(result))
        return [result]
    peak = matmul_peak(device, dtype)
    meta = header(args, geom, device, peak)
    child_argv = [a for a in argv if a not in ("--isolate",)]
    child_argv = _without_option(child_argv, "--rows", "--json", "--compare")
    rows = []
    for row in args.rows:
        if args.isolate:
            rows.append(_run_isolated(row, child_argv, args.sp))
        else:
            rows.append(measure_row(row, geom, dtype, device, args.warmup, args.repeats))
    rows += derived_rows(rows, _recipe(geom).dfake_gen_update_ratio)
    if not rank0:
        return rows
    old = json.loads(args.compare.read_text()) if args.compare else None
    print_table(meta, rows, old)
    if args.json is not None:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


def _without_option(argv: list[str], *names: str) -> list[str]:
    """`argv` without `--name value` / `--name=value` for each of `names`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in names:
            skip = True
            continue
        if any(a.startswith(n + "=") for n in names):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    main()
