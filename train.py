"""Train a Self-Forcing generator: one trainer for every objective (`trainer: dmd|sid|gan|ode|diffusion|causvid`).

    torchrun --nproc_per_node 8 train.py --config configs/self_forcing_dmd.yaml --logdir runs/dmd
    python train.py --config configs/tiny_dmd.yaml --logdir runs/tiny max_steps=10

Steps (upstream's meaning, spec §6.3): every step trains the critic (when the objective has one);
every `dfake_gen_update_ratio`-th step also trains the generator first. Each optimizer step
accumulates `gradient_accumulation_steps` micro-batches so that `total_batch_size` is honoured.

Randomness: every micro-batch reseeds the global RNG from (seed, step, role, global micro-batch
index), so ranks draw different noise, a run is reproducible, and 2 ranks x 1 micro-batch compute
exactly what 1 rank x 2 micro-batches does. The choices all ranks must share (exit steps, number of
blocks) are drawn once per optimizer step on rank 0 and broadcast.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from model.build import NEEDS, build_objective_from_config, build_vae
from recipe.data import Batches, open_dataset
from recipe.optimizers import build_optimizers
from recipe.resume import reconcile_with_run_record, restore_latest
from recipe.roles import Placement, build_dit_role, build_text_encoder_role
from recipe.samples import sample_videos
from recipe.state import TrainerState, TrainingDivergedError, micro_seed
from recipe.stop import StopSignals, check_divergence
from utils.checkpoint import Checkpointer, ModelState, OptimizerState, ScalarState, SchedulerState
from utils.config import TrainConfig, config_to_dict, ema_rates, load_config, resolve_accumulation
from utils.dataset import StatefulDistributedSampler, infinite_loader
from utils.distributed import (
    DistInfo,
    all_reduce_mean_sparse,
    broadcast_object,
    build_mesh,
    cleanup,
    init_distributed,
    seed_everything,
    seed_torch_rng,
    set_gradient_sync,
)
from utils.ema import EMA, ema_entry_names
from utils.errors import UserError, exit_code_of
from utils.host_memory import keep_freed_host_memory
from utils.logging import MetricsLogger, WandbSettings, setup_logging
from utils.optim import clip_grad_norm
from utils.run_record import OVERRIDE_FLAG, write_config
from utils.sequence_parallel import ParallelDims, init_sequence_parallel

logger = logging.getLogger("train")

__all__ = ["Trainer", "TrainerState", "TrainingDivergedError", "main", "micro_seed"]


class Trainer:
    """The recipe: `setup()` (processes, roles, objective, optimizers, data, resume), `train()` (the
    step, repeated), the checkpoint/stop policy at the end of each step, `cleanup()`."""

    def __init__(
        self,
        cfg: TrainConfig,
        logdir: str | Path,
        no_save: bool = False,
        no_visualize: bool = False,
        allow_config_change: bool = False,
    ):
        self.cfg = cfg
        self.run_dir = Path(logdir)
        self.no_save = no_save
        self.no_visualize = no_visualize
        self.allow_config_change = allow_config_change
        self.state = TrainerState()

    # ------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        # 1. processes, logging, seeds
        self.dist: DistInfo = init_distributed()
        setup_logging(self.dist.rank)
        self.device = self.dist.device
        if self.device.type == "cpu":  # activations live in host memory: reuse it across steps
            keep_freed_host_memory()
        # world_size = dp x sp: the ranks of a sequence-parallel group share batches and noise, so data,
        # seeds and accumulation count data-parallel replicas (`dp`), not processes.
        self.parallel: ParallelDims = init_sequence_parallel(cfg.sp_size, self.dist)
        self.accum = resolve_accumulation(cfg, self.parallel.dp_size)
        reconcile_with_run_record(cfg, self.run_dir, self.dist.rank, self.allow_config_change)
        self.seed = cfg.seed
        seed_everything(self.seed + self.parallel.dp_rank)
        logger.info(
            "trainer=%s world_size=%d sp_size=%d device=%s accumulation=%d total_batch_size=%d",
            cfg.trainer,
            self.dist.world_size,
            cfg.sp_size,
            self.device,
            self.accum,
            cfg.total_batch_size,
        )
        self.latent_dtype = torch.bfloat16 if cfg.mixed_precision else torch.float32
        # One process without mixed precision: FSDP2 would shard over one rank, i.e. only add its
        # per-block hooks and DTensor dispatch (README "Training speed"). The plain modules take the
        # same steps up to float round-off (autograd sums a few gradients in another order), and DCP
        # checkpoints of either load into the other.
        self.shard_dits = self.dist.world_size > 1 or cfg.mixed_precision
        self.mesh = build_mesh(
            cfg.sharding_strategy,
            self.dist.world_size,
            self.dist.local_world_size,
            device_type=self.device.type,
        )
        where = Placement(self.dist.rank, self.device, self.mesh, self.parallel, self.shard_dits, self.seed)

        # 2. frozen networks (replicated): text encoder and, when needed, the VAE
        self.text_encoder = build_text_encoder_role(cfg, where)
        needs_vae = cfg.i2v or cfg.num_training_frames > cfg.image_or_video_shape[1] or cfg.sample_every > 0
        self.vae = build_vae(cfg, self.device) if needs_vae else None

        # 3. DiTs: built on meta, sharded, weights read on rank 0 and broadcast
        needs_real, needs_critic = NEEDS[cfg.trainer]
        self.generator = build_dit_role(cfg, "generator", where, trainable=True)
        self.real_score = build_dit_role(cfg, "real_score", where, trainable=False) if needs_real else None
        self.critic = (
            build_dit_role(cfg, "fake_score", where, trainable=True, gan_head=cfg.trainer == "gan")
            if needs_critic
            else None
        )
        try:  # the objectives check their settings: a refusal there is a configuration error
            self.objective = build_objective_from_config(
                cfg, self.generator, self.real_score, self.critic, self.vae, self.latent_dtype
            )
        except ValueError as err:
            raise UserError(f"trainer={cfg.trainer}: {err}") from err

        # 4. optimisers, LR schedules, EMA (one per rate, as improved-diffusion keeps several; of the
        #    adapters only, for LoRA)
        self.optim = build_optimizers(cfg, self.generator, self.critic)
        self.emas = {rate: EMA(self.generator) for rate in ema_rates(cfg)}

        # 5. data: checked on every rank; each data-parallel replica reads its own share
        self.dataset = open_dataset(cfg)
        self.sampler = StatefulDistributedSampler(
            len(self.dataset), self.parallel.dp_rank, self.parallel.dp_size, shuffle=True, seed=self.seed,
            drop_last=True,
        )  # fmt: skip
        loader = infinite_loader(self.dataset, self.sampler, cfg.batch_size)
        self.batches = Batches(loader, self.text_encoder, cfg.negative_prompt, self.device, self.latent_dtype)

        # 6. checkpoints: resume from the latest complete one; metrics.jsonl forgets the steps after
        #    it (they are about to be redone)
        self.checkpointer = Checkpointer(self.run_dir, keep_last=cfg.keep_last_checkpoints)
        wandb = WandbSettings(
            mode=cfg.wandb_mode, project=cfg.wandb_project, entity=cfg.wandb_entity, name=self.run_dir.name,
            config=config_to_dict(cfg),
        )  # fmt: skip
        self.metrics = MetricsLogger(self.run_dir, self.dist.rank, wandb)
        step = None
        if cfg.resume:
            step = restore_latest(
                self.checkpointer, self._checkpoint_state(), self.optim.by_name(), self.optim.lr_schedulers
            )
        self.metrics.truncate_after(step or 0)
        # Every check has passed: only now does this start become the run's record.
        if self.dist.rank == 0:
            write_config(cfg, self.run_dir)
        self.signals = StopSignals(self.dist.rank, self.dist.world_size, self.device)
        self.signals.install()

    def _checkpoint_state(self) -> dict[str, Any]:
        optimizers, schedulers = self.optim.optimizers, self.optim.lr_schedulers
        state: dict[str, Any] = {
            "generator": ModelState(self.generator, optimizers["generator"]),
            "trainer": ScalarState(self.state),
            "sampler": ScalarState(self.sampler),
            "lr_generator": SchedulerState(schedulers["generator"]),
        }
        if self.critic is not None:
            state["critic"] = ModelState(self.critic, optimizers["critic"])
            state["lr_critic"] = SchedulerState(schedulers["critic"])
        for rate, name in ema_entry_names(list(self.emas)).items():
            state[name] = self.emas[rate]
        if self.optim.warmup_optimizer is not None:
            state["critic_warmup_optim"] = OptimizerState(self.critic, self.optim.warmup_optimizer)
        return state

    # ------------------------------------------------------------------------------------ the step
    def _next_batch(self) -> dict[str, torch.Tensor]:
        return self.batches.next()

    def _optimizer_step(self, role: str) -> dict[str, float]:
        cfg, step = self.cfg, self.state.step
        module = self.generator if role == "generator" else self.critic
        warming_up = role == "critic" and self._in_discriminator_warmup()
        optimizer = self.optim.warmup_optimizer if warming_up else self.optim.optimizers[role]
        optimizer.zero_grad(set_to_none=True)
        shared = None
        if self.dist.rank == 0:
            g = torch.Generator().manual_seed(micro_seed(self.seed, step, f"{role}/shared", 0))
            shared = self.objective.sample_shared(cfg.batch_size, g)
        shared = broadcast_object(shared)
        loss_fn = self.objective.generator_loss if role == "generator" else self.objective.critic_loss
        total_loss = torch.zeros((), dtype=torch.float64, device=self.device)
        sums: dict[str, float] = defaultdict(float)
        for micro in range(self.accum):
            batch = self._next_batch()
            global_index = micro * self.parallel.dp_size + self.parallel.dp_rank
            seed_torch_rng(micro_seed(self.seed, step, role, global_index), self.device)
            set_gradient_sync([module], micro == self.accum - 1)
            loss, metrics = loss_fn(batch, shared)
            (loss / self.accum).backward()
            total_loss += loss.detach().double() / self.accum
            for k, v in metrics.items():
                sums[k] += float(v) / self.accum
        # The loss is averaged over ranks for logging; a non-finite value anywhere skips the step.
        torch.distributed.all_reduce(total_loss)
        total_loss /= self.dist.world_size
        if warming_up:  # only the head's parameters change during the warm-up
            head = {id(p) for p in self.optim.head_params}
            for p in module.parameters():
                if id(p) not in head:
                    p.grad = None
        max_norm = cfg.max_grad_norm_generator if role == "generator" else cfg.max_grad_norm_critic
        grad_norm = clip_grad_norm(module, max_norm)
        out = {
            f"{role}_loss": float(total_loss),
            f"{role}_grad_norm": grad_norm,
            f"{role}_lr": optimizer.param_groups[0]["lr"],
        }
        averaged = all_reduce_mean_sparse(sums, self.device)  # every rank's values, not rank 0's
        out.update({k: v for k, v in averaged.items() if k not in out})
        if not (math.isfinite(float(total_loss)) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            self.state.nan_skips += 1
            logger.warning(
                "step %d: non-finite %s loss/grad (%s, %s); step skipped",
                step,
                role,
                float(total_loss),
                grad_norm,
            )
            out[f"{role}_skipped"] = 1.0
            return out
        optimizer.step()
        if not warming_up:
            self.optim.lr_schedulers[role].step()
        optimizer.zero_grad(set_to_none=True)
        if role == "generator" and self.state.ema_active:
            for rate, ema in self.emas.items():
                ema.update(self.generator, rate)
        return out

    def train(self) -> None:
        cfg = self.cfg
        bar = None
        if self.dist.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.state.step, desc=cfg.trainer, dynamic_ncols=True)
        self.generator.train()
        while self.state.step < cfg.max_steps:
            if self.train_step(bar):
                break
        if bar is not None:
            bar.close()
        if not self.no_save and self.state.step >= cfg.max_steps:
            latest = self.checkpointer.latest() if self.dist.rank == 0 else None
            if broadcast_object(latest is None or latest[0] != self.state.step):
                self.save()

    def train_step(self, bar: Any = None) -> bool:
        """One step of the loop: the optimizer steps and everything around them (EMA start, metrics,
        samples, divergence check, the agreed stop, the checkpoint policy). True: stop the run now."""
        cfg = self.cfg
        has_critic = self.critic is not None
        started = time.perf_counter()
        step = self.state.step
        metrics: dict[str, float] = {}
        if (not has_critic or step % cfg.dfake_gen_update_ratio == 0) and not self._in_discriminator_warmup():
            metrics.update(self._optimizer_step("generator"))
        if has_critic:
            metrics.update(self._optimizer_step("critic"))
        self.state.step += 1
        skipped = any(k.endswith("_skipped") for k in metrics)
        self.state.nan_streak = self.state.nan_streak + 1 if skipped else 0
        # Upstream (re)initialises the EMA from the current weights once ema_start_step is reached.
        if self.emas and not self.state.ema_active and self.state.step >= cfg.ema_start_step:
            for ema in self.emas.values():
                ema.copy_from(self.generator)
            self.state.ema_active = True
        metrics["step_time"] = time.perf_counter() - started
        metrics["nan_skips"] = self.state.nan_skips
        metrics["nan_streak"] = self.state.nan_streak
        if self.device.type == "cuda":
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.metrics.log(self.state.step, metrics)
        if bar is not None:
            loss_key = "critic_loss" if has_critic else "generator_loss"
            bar.set_postfix(loss=f"{metrics.get(loss_key, float('nan')):.4g}")
            bar.update(1)
        # the checkpoint/stop policy
        if cfg.sample_every and self.state.step % cfg.sample_every == 0 and not self.no_visualize:
            self._log_samples()
        check_divergence(
            self.state.step, self.state.nan_streak, cfg.max_nan_skips, self.checkpointer, self.dist.rank
        )
        stop = self.signals.agreed(self.state.step)
        if not self.no_save and (self.state.step % cfg.log_iters == 0 or stop):
            self.save()
        if not stop and self.state.step % cfg.gc_interval == 0:
            gc.collect()
        return stop

    def _in_discriminator_warmup(self) -> bool:
        return (
            self.optim.warmup_optimizer is not None and self.state.step < self.cfg.discriminator_warmup_steps
        )

    # ------------------------------------------------------------------------------------ checkpoint policy
    def save(self) -> None:
        if self.state.nan_streak > 0:
            # The weights that produced the non-finite step are suspect: keep the last good checkpoint.
            logger.warning(
                "step %d: not saving a checkpoint, the last %d steps were skipped as non-finite",
                self.state.step,
                self.state.nan_streak,
            )
            return
        self.checkpointer.save(self.state.step, self._checkpoint_state())

    def _log_samples(self) -> None:
        """A few videos from the current (EMA when active) generator; every rank takes part."""
        cfg = self.cfg
        rate = cfg.sample_ema_weight if cfg.sample_ema_weight is not None else next(iter(self.emas), None)
        ema = self.emas.get(rate) if self.state.ema_active else None
        videos = sample_videos(
            cfg, self.generator, self.text_encoder, self.vae, self.dataset, ema, self.seed, self.device,
            self.latent_dtype,
        )  # fmt: skip
        for i, video in enumerate(videos if videos is not None else []):
            self.metrics.log_video(self.state.step, f"sample{i}", video.float(), fps=16)

    def cleanup(self, ok: bool = True) -> None:
        if hasattr(self, "metrics"):
            self.metrics.close()
        # Release everything that holds the device mesh before the process group goes (see
        # utils.distributed.cleanup); the Trainer object itself may outlive this call.
        for name in ("objective", "generator", "real_score", "critic", "text_encoder", "vae", "emas", "optim",
                     "mesh", "checkpointer", "parallel"):  # fmt: skip
            self.__dict__.pop(name, None)
        cleanup(synchronize=ok)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Self-Forcing training (one trainer for every objective)")
    p.add_argument("--config", "--config_path", dest="config", required=True, help="experiment YAML")
    p.add_argument(
        "--logdir",
        default=None,
        help="run directory (default: logdir from the config, else runs/<config stem>)",
    )
    p.add_argument("--no_save", action="store_true", help="do not write checkpoints")
    p.add_argument("--no_visualize", action="store_true", help="do not generate sample videos")
    p.add_argument("--disable-wandb", "--disable_wandb", dest="disable_wandb", action="store_true")
    p.add_argument(
        OVERRIDE_FLAG,
        dest="allow_config_change",
        action="store_true",
        help="resume even though keys that define the run (trainer, models, seed, data, ...) changed",
    )
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p.parse_intermixed_args(argv)  # flags may follow key=value overrides


def run(args: argparse.Namespace) -> None:
    overrides = list(args.overrides)
    if args.disable_wandb:
        overrides.append("wandb_mode=disabled")
    cfg = load_config(args.config, overrides)
    logdir = args.logdir or cfg.logdir or str(Path("runs") / Path(args.config).stem)
    cfg.logdir = logdir
    trainer = Trainer(
        cfg,
        logdir,
        no_save=args.no_save,
        no_visualize=args.no_visualize,
        allow_config_change=args.allow_config_change,
    )
    ok = False
    try:
        trainer.setup()
        trainer.train()
        ok = True
    finally:
        trainer.cleanup(ok)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 a user error (config, data, checkpoint: one message, from rank 0 only);
    anything else is a bug and keeps its traceback."""
    args = parse_args(argv)
    return exit_code_of(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
