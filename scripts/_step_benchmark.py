"""`scripts/benchmark.py --config <training yaml> [key=value ...]`: train.py's real step against a bare loop.

* trainer: `train.Trainer` built from the config exactly as `train.py` builds it (temporary run
  directory, no checkpoint writes: those happen every `log_iters` steps), timed per `train_step()`:
  the optimizer steps with everything the loop does around them (data loading, per-micro-batch
  seeding, shared draws, gradient clipping, metric reductions, metrics.jsonl, the agreed stop).
* bare: the same networks built by the same builders (`model/build.py`: `build_dit`, `set_trainable`,
  `fixed_real_score`, `build_objective_from_config`) as plain modules, one AdamW per role, the
  objective's own losses, batches drawn from the trainer's loader beforehand and reused from memory.
  A step is `zero_grad, loss, backward, step` per role; nothing else.

Both run in this one process, alternating (trainer, bare, trainer, ...) over whole cycles of
`dfake_gen_update_ratio` steps, so they see the same machine load and the same mix of generator and
critic steps; step k of either draws the same shared choices (exit steps), so both do the same work.
Reported per step: median / min / max wall time, median CPU time (all threads of the process) and
minor page faults, and the trainer/bare ratio of the medians. The bare loop does not mirror mixed
precision (it runs in fp32) nor the GAN discriminator warm-up.
"""

from __future__ import annotations

import json
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from model.build import (
    NEEDS,
    build_dit,
    build_objective_from_config,
    fixed_real_score,
    lora_spec,
    set_trainable,
)
from train import Trainer, micro_seed
from utils.config import TrainConfig, load_config
from utils.optim import build_optimizer


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class BareLoop:
    """The config's networks, objective and AdamW as plain modules, trained on batches held in memory."""

    def __init__(self, cfg: TrainConfig, trainer: Trainer, batches: list[dict[str, torch.Tensor]]) -> None:
        self.cfg, self.batches, self.device = cfg, batches, trainer.device
        needs_real, needs_critic = NEEDS[cfg.trainer]
        self.generator = self._dit("generator", trainable=True)
        real = self._dit("real_score", trainable=False) if needs_real else None
        self.critic = (
            self._dit("fake_score", trainable=True, gan_head=cfg.trainer == "gan") if needs_critic else None
        )
        self.objective = build_objective_from_config(
            cfg, self.generator, real, self.critic, trainer.vae, torch.float32
        )
        self.optimizers = {
            "generator": build_optimizer(
                self.generator.parameters(), cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay
            )
        }
        if self.critic is not None:
            self.optimizers["critic"] = build_optimizer(
                self.critic.parameters(),
                cfg.lr_critic,
                (cfg.beta1_critic, cfg.beta2_critic),
                cfg.weight_decay,
            )
        self.generator.train()

    def _dit(self, role: str, trainable: bool, gan_head: bool = False) -> torch.nn.Module:
        cfg = self.cfg
        fixed = fixed_real_score(cfg, self.device) if role == "real_score" else None
        if fixed is not None:
            return fixed
        lora = lora_spec(cfg, role) if trainable else None
        lora_seed = micro_seed(cfg.seed, 0, f"{role}/lora", 0)
        net = build_dit(cfg, role, seed=cfg.seed, gan_head=gan_head, lora=lora, lora_seed=lora_seed)
        set_trainable(net, cfg, role, trainable, lora)
        net.to(self.device)
        if cfg.compile:
            for block in net.model.blocks:
                block.compile()
        return net if trainable else net.eval()

    def step(self, step: int) -> None:
        cfg = self.cfg
        batch = self.batches[step % len(self.batches)]
        roles = ["critic"] if self.critic is not None else []
        if self.critic is None or step % cfg.dfake_gen_update_ratio == 0:
            roles.insert(0, "generator")
        for role in roles:
            optimizer = self.optimizers[role]
            optimizer.zero_grad(set_to_none=True)
            g = torch.Generator().manual_seed(micro_seed(cfg.seed, step, f"{role}/shared", 0))
            shared = self.objective.sample_shared(cfg.batch_size, g)
            loss_fn = self.objective.generator_loss if role == "generator" else self.objective.critic_loss
            loss, _ = loss_fn(batch, shared)
            loss.backward()
            optimizer.step()


def _summary(wall: list[float], cpu: list[float], faults: list[float]) -> dict[str, float]:
    return {
        "median_s": statistics.median(wall),
        "min_s": min(wall),
        "max_s": max(wall),
        "cpu_median_s": statistics.median(cpu),
        "faults_per_step": statistics.median(faults),
    }


def compare(
    config: Path, overrides: list[str], warmup: int, repeats: int, batches: int = 4
) -> dict[str, Any]:
    """Alternate `repeats` timed cycles of the trainer and of the bare loop (after `warmup` each)."""
    cfg = load_config(config, [*overrides, "wandb_mode=disabled", "sample_every=0"])
    with tempfile.TemporaryDirectory() as run_dir:
        cfg.logdir = run_dir
        trainer = Trainer(cfg, run_dir, no_save=True, no_visualize=True)
        try:
            trainer.setup()
            trainer.generator.train()
            bare = BareLoop(cfg, trainer, [trainer._next_batch() for _ in range(batches)])
            cycle = cfg.dfake_gen_update_ratio if trainer.critic is not None else 1
            bare_step = [trainer.state.step]  # the same step indices: the same shared draws

            def run_trainer() -> None:
                if trainer.train_step():  # a signal asked the run to stop
                    raise KeyboardInterrupt

            def run_bare() -> None:
                bare.step(bare_step[0])
                bare_step[0] += 1

            samples: dict[str, tuple[list[float], list[float], list[float]]] = {
                "trainer": ([], [], []),
                "bare": ([], [], []),
            }
            runs: dict[str, Callable[[], None]] = {"trainer": run_trainer, "bare": run_bare}
            for r in range(warmup + repeats):
                for name, fn in runs.items():
                    f0, c0, t0 = _faults(), time.process_time(), time.perf_counter()
                    for _ in range(cycle):
                        fn()
                    t1, c1, f1 = time.perf_counter(), time.process_time(), _faults()
                    if r >= warmup:
                        wall, cpu, faults = samples[name]
                        wall.append((t1 - t0) / cycle)
                        cpu.append((c1 - c0) / cycle)
                        faults.append((f1 - f0) / cycle)
            rows = {name: _summary(*values) for name, values in samples.items()}
            meta = {
                "config": str(config),
                "overrides": overrides,
                "trainer": cfg.trainer,
                "world_size": trainer.dist.world_size,
                "device": str(trainer.device),
                "threads": torch.get_num_threads(),
                "batch_size": cfg.batch_size,
                "steps_per_cycle": cycle,
                "fsdp": trainer.shard_dits,
                "warmup_cycles": warmup,
                "timed_cycles": repeats,
            }
        finally:
            trainer.cleanup()
    ratio = rows["trainer"]["median_s"] / rows["bare"]["median_s"]
    cpu_ratio = rows["trainer"]["cpu_median_s"] / rows["bare"]["cpu_median_s"]
    return {"meta": meta, "rows": rows, "ratio": ratio, "cpu_ratio": cpu_ratio}


def print_comparison(result: dict[str, Any]) -> None:
    m = result["meta"]
    print(
        f"config={m['config']} {' '.join(m['overrides'])} trainer={m['trainer']} world_size={m['world_size']} "
        f"device={m['device']} threads={m['threads']} batch={m['batch_size']} fsdp={m['fsdp']} "
        f"steps/cycle={m['steps_per_cycle']} cycles={m['timed_cycles']} (+{m['warmup_cycles']} warm-up)"
    )
    print(f"{'per step':<14}{'median ms':>11}{'min':>9}{'max':>9}{'CPU ms':>9}{'faults':>9}")
    for name, r in result["rows"].items():
        print(
            f"{name:<14}{r['median_s'] * 1e3:>11.1f}{r['min_s'] * 1e3:>9.1f}{r['max_s'] * 1e3:>9.1f}"
            f"{r['cpu_median_s'] * 1e3:>9.1f}{r['faults_per_step']:>9.0f}"
        )
    print(
        f"ratio trainer/bare: {result['ratio']:.2f} (wall medians), {result['cpu_ratio']:.2f} (CPU medians)"
    )


def main(
    config: Path, overrides: list[str], warmup: int, repeats: int, json_out: Path | None
) -> dict[str, Any]:
    result = compare(config, overrides, warmup, repeats)
    print_comparison(result)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1))
    return result
