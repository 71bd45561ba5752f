"""Time the causal Wan generator with random weights and print a table of medians.

Measures, for a preset geometry (default: the real 1.3B at 480x832, 21 latent frames, blocks of 3):
  * cached block-by-block inference: latency of one block (K denoising steps + the cache refresh) and
    the whole video, with and without VAE (VAE is not timed here: this is the DiT alone);
  * the training path: one forward and forward+backward over all frames with the block mask
    (flex on CUDA, dense SDPA elsewhere).

On a GPU machine:  python scripts/benchmark_model.py --preset wan2.1-t2v-1.3b --dtype bf16
On CPU (smoke):    python scripts/benchmark_model.py --preset tiny --latent 8 8 --frames 6
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from wan import CausalWanModel, CrossAttentionCache, KVCache, WanConfig
from wan.attention import describe_backends


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, repeats: int) -> list[float]:
    fn()  # warm-up (compilation, allocator)
    out = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wan2.1-t2v-1.3b")
    p.add_argument("--latent", type=int, nargs=2, default=(60, 104), metavar=("H", "W"))
    p.add_argument("--frames", type=int, default=21)
    p.add_argument("--num_frame_per_block", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="denoising steps per block")
    p.add_argument(
        "--dtype", choices=("fp32", "bf16"), default="bf16" if torch.cuda.is_available() else "fp32"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip_train", action="store_true")
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = WanConfig.preset(args.preset)
    with torch.device(device):
        model = CausalWanModel(cfg, num_frame_per_block=args.num_frame_per_block).to(dtype).eval()
    h, w = args.latent
    n, f = args.num_frame_per_block, args.frames
    x = torch.randn(1, cfg.in_dim, f, h, w, device=device, dtype=dtype)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=device, dtype=dtype)
    kv = KVCache.for_model(model, 1, (h, w), f, dtype=dtype, device=device)
    xc = CrossAttentionCache.for_model(model)
    rows = []

    @torch.no_grad()
    def video() -> None:
        kv.reset()
        xc.reset()
        for s in range(0, f, n):
            block = x[:, :, s : s + n]
            t = torch.full((1, n), 500.0, device=device)
            for _ in range(args.steps + 1):  # K denoising steps + the clean-context refresh
                model(block, t, ctx, kv_cache=kv, crossattn_cache=xc, current_start_frame=s)

    times = _time(video, device, args.repeats)
    med = statistics.median(times)
    blocks = f // n
    rows.append(("cached video (DiT only)", med, f"{blocks * (args.steps + 1)} calls, {f * 4 - 3} px frames"))
    rows.append(("  per block", med / blocks, f"{(f * 4 - 3) / med:.1f} px-frames/s"))

    if not args.skip_train:
        model.enable_gradient_checkpointing(True)
        t_all = torch.full((1, f), 500.0, device=device)

        @torch.no_grad()
        def fwd() -> None:
            model(x, t_all, ctx)

        def fwd_bwd() -> None:
            model(x, t_all, ctx).float().square().mean().backward()

        rows.append(("training path forward", statistics.median(_time(fwd, device, args.repeats)), ""))
        rows.append(
            ("training path fwd+bwd (ckpt)", statistics.median(_time(fwd_bwd, device, args.repeats)), "")
        )

    print(
        f"device={device} dtype={args.dtype} preset={args.preset} latent={h}x{w} frames={f} backends={describe_backends(device)}"
    )
    if device.type == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    print(f"{'what':<32}{'median s':>12}  note")
    for name, sec, note in rows:
        print(f"{name:<32}{sec:>12.4f}  {note}")


if __name__ == "__main__":
    main()
