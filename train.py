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
import contextlib
import gc
import hashlib
import logging
import math
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.checkpoint.stateful import Stateful

from model.build import (
    NEEDS,
    build_dit,
    build_objective_from_config,
    build_text_encoder,
    build_vae,
    dit_structure,
    fixed_real_score,
    lora_spec,
    set_trainable,
)
from utils.checkpoint import Checkpointer, ModelState, OptimizerState, ScalarState
from utils.config import (
    TrainConfig,
    config_to_dict,
    ema_rates,
    load_config,
    lr_decay_horizon,
    resolve_accumulation,
)
from utils.dataset import (
    LatentLMDBDataset,
    ODERegressionLMDBDataset,
    StatefulDistributedSampler,
    TextDataset,
    check_row_shape,
    infinite_loader,
)
from utils.distributed import (
    DistInfo,
    all_reduce_mean_sparse,
    broadcast_object,
    build_mesh,
    cleanup,
    init_distributed,
    load_full_state_dict,
    raise_user_error_everywhere,
    reshard_after_forward_for,
    resolve_seed,
    seed_everything,
    seed_torch_rng,
    set_gradient_sync,
    shard_model,
)
from utils.ema import EMA, ema_entry_names
from utils.errors import UserError, exit_code_of
from utils.host_memory import keep_freed_host_memory
from utils.logging import MetricsLogger, WandbSettings, setup_logging
from utils.lora import add_lora
from utils.optim import (
    apply_base_lrs,
    apply_schedule,
    build_optimizer,
    build_scheduler,
    clip_grad_norm,
    schedule_settings,
)
from utils.run_record import OVERRIDE_FLAG, check_resume_config, saved_run_config, write_config
from utils.sequence_parallel import ParallelDims, enable_sequence_parallel, init_sequence_parallel
from wan import WanDiffusionWrapper
from wan.gan_head import gan_head_parameter_names

logger = logging.getLogger("train")


class TrainerState(Stateful):
    """Counters of the loop that must survive a restart (checkpointed as tensors, `ScalarState`)."""

    def __init__(self) -> None:
        self.step = 0
        self.nan_skips = 0  # skipped optimizer steps in total
        self.nan_streak = 0  # consecutive training steps with a skipped optimizer step
        self.ema_active = False

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "nan_skips": self.nan_skips,
            "nan_streak": self.nan_streak,
            "ema_active": self.ema_active,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.nan_skips = int(state["nan_skips"])
        self.nan_streak = int(state["nan_streak"])
        self.ema_active = bool(state["ema_active"])


class TrainingDivergedError(UserError):
    """Too many consecutive non-finite steps (`max_nan_skips`)."""


def micro_seed(seed: int, step: int, role: str, index: int) -> int:
    """The seed of one random draw of the run: a hash of (seed, step, role, index), the same on every
    rank and at any world size, so draws never depend on how the run was split or resumed."""
    digest = hashlib.sha256(f"{seed}/{step}/{role}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


class Trainer:
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
        self._stop_signal: int | None = None

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
        self._reconcile_with_run_record()
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
        gpus_per_node = self.dist.local_world_size
        self.mesh = build_mesh(
            cfg.sharding_strategy, self.dist.world_size, gpus_per_node, device_type=self.device.type
        )

        # 2. frozen networks (replicated): text encoder and, when needed, the VAE
        self.text_encoder = self._build_text_encoder()
        needs_vae = cfg.i2v or cfg.num_training_frames > cfg.image_or_video_shape[1] or cfg.sample_every > 0
        self.vae = build_vae(cfg, self.device) if needs_vae else None

        # 3. DiTs: built on meta, sharded, weights read on rank 0 and broadcast
        needs_real, needs_critic = NEEDS[cfg.trainer]
        self.generator = self._build_dit("generator", trainable=True)
        self.real_score = self._build_dit("real_score", trainable=False) if needs_real else None
        self.critic = (
            self._build_dit("fake_score", trainable=True, gan_head=cfg.trainer == "gan")
            if needs_critic
            else None
        )
        try:  # the objectives check their settings: a refusal there is a configuration error
            self.objective = build_objective_from_config(
                cfg, self.generator, self.real_score, self.critic, self.vae, self.latent_dtype
            )
        except ValueError as err:
            raise UserError(f"trainer={cfg.trainer}: {err}") from err

        # 4. optimisers, EMA
        self.optimizers = {
            "generator": build_optimizer(
                self.generator.parameters(), cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay
            )
        }
        self.head_params: list[nn.Parameter] = []
        self.warmup_optimizer = None
        if self.critic is not None:
            if (
                cfg.trainer == "gan"
            ):  # the discriminator head trains at lr_critic x discriminator_lr_multiplier
                names = gan_head_parameter_names(self.critic)
                self.head_params = [p for n, p in self.critic.named_parameters() if n in names]
            self.optimizers["critic"] = build_optimizer(
                self.critic.parameters(),
                cfg.lr_critic,
                (cfg.beta1_critic, cfg.beta2_critic),
                cfg.weight_decay,
                lr_multipliers=[(self.head_params, cfg.discriminator_lr_multiplier)]
                if self.head_params
                else (),
            )
            if cfg.trainer == "gan" and cfg.discriminator_warmup_steps > 0:
                # Upstream's warm-up: only the head trains (Adam beta1 0.9), then the main optimizer
                # starts fresh; the generator waits.
                self.warmup_optimizer = build_optimizer(
                    self.head_params,
                    cfg.lr_critic * cfg.discriminator_lr_multiplier,
                    (0.9, cfg.beta2_critic),
                    cfg.weight_decay,
                )
        self.lr_schedulers = {k: self._lr_scheduler(k, o) for k, o in self.optimizers.items()}
        # One EMA per rate (improved-diffusion keeps several); of the adapters only, for LoRA.
        self.emas = {rate: EMA(self.generator) for rate in ema_rates(cfg)}

        # 5. data
        self._build_data()

        # 6. checkpoints: resume from the latest complete one
        self.checkpointer = Checkpointer(self.run_dir, keep_last=cfg.keep_last_checkpoints)
        self.metrics = MetricsLogger(
            self.run_dir,
            self.dist.rank,
            WandbSettings(
                mode=cfg.wandb_mode,
                project=cfg.wandb_project,
                entity=cfg.wandb_entity,
                name=self.run_dir.name,
                config=config_to_dict(cfg),
            ),
        )
        self._resume()
        # Every check has passed: only now does this start become the run's record.
        if self.dist.rank == 0:
            write_config(cfg, self.run_dir)
        # Pre-emption (SIGTERM/SIGUSR1) and a first Ctrl-C (SIGINT) finish the step, save and stop;
        # a second Ctrl-C interrupts at once.
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _lr_scheduler(self, role: str, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """Warm-up, then constant or a linear/cosine decay to lr_min (generator) / lr_min_critic."""
        cfg = self.cfg
        peak, low = (cfg.lr, cfg.lr_min) if role == "generator" else (cfg.lr_critic, cfg.lr_min_critic)
        decay_steps = lr_decay_horizon(cfg.lr_decay_steps, cfg.max_steps, cfg.lr_warmup_steps)
        return build_scheduler(
            optimizer, cfg.lr_warmup_steps, cfg.lr_schedule, decay_steps, low / peak if peak > 0 else 1.0
        )

    def _reconcile_with_run_record(self) -> None:
        """Before anything is built: a run that resumes keeps its seed (`seed: 0` was resolved once,
        at the run's first start) and must not change the keys that define it (utils/run_record.py);
        a new run resolves `seed: 0` to a drawn seed."""
        cfg = self.cfg
        saved, error = None, None
        if cfg.resume and self.dist.rank == 0:
            try:
                saved = saved_run_config(self.run_dir)
            except UserError as err:
                error = err
        raise_user_error_everywhere(error)
        saved = broadcast_object(saved)
        if saved is None:  # a new run
            cfg.seed = resolve_seed(cfg.seed)
            return
        if cfg.seed == 0:
            if not saved.get("seed"):
                raise UserError(
                    f"{self.run_dir} has checkpoints but no config.yaml with the seed its run drew "
                    "(seed: 0); pass the run's seed as seed=<n>"
                )
            cfg.seed = int(saved["seed"])
        if saved:
            check_resume_config(saved, cfg, self.allow_config_change)

    def _resume(self) -> None:
        """Load the latest checkpoint, if any; then this run's learning rates replace the restored ones
        and metrics.jsonl forgets the steps after the checkpoint (they are about to be redone)."""
        cfg = self.cfg
        step = None
        if cfg.resume:
            # This run's configured rates: a scheduler keeps them as `initial_lr` (its `lr` is already
            # scaled by the schedule's factor at step 0, e.g. a warm-up's).
            base_lrs = {
                name: [g.get("initial_lr", g["lr"]) for g in opt.param_groups]
                for name, opt in self._optimizers_by_name()
            }
            # The schedules as this config builds them (a changed decay horizon passed the run-record
            # check only with the override flag): the load brings back the saved run's.
            schedules = {name: schedule_settings(s) for name, s in self.lr_schedulers.items()}
            step = self.checkpointer.load_latest(self._checkpoint_state())
            for name, opt in self._optimizers_by_name():
                apply_base_lrs(opt, self.lr_schedulers.get(name), base_lrs[name])
            for name, scheduler in self.lr_schedulers.items():
                apply_schedule(scheduler, schedules[name])
            if step is not None:
                logger.info("resumed from step %d", step)
        self.metrics.truncate_after(step or 0)

    def _optimizers_by_name(self) -> list[tuple[str, torch.optim.Optimizer]]:
        named = list(self.optimizers.items())
        if self.warmup_optimizer is not None:
            named.append(("critic_warmup", self.warmup_optimizer))
        return named

    def _build_text_encoder(self):
        """Frozen umT5: structure on meta everywhere, weights read by rank 0 only and broadcast, sharded
        like the DiTs (one unit per umT5 block), optionally with its parameters kept on the CPU."""
        cfg = self.cfg
        dtype = torch.bfloat16 if cfg.mixed_precision else torch.float32
        if cfg.text_encoder is not None:  # a component: every rank builds its own, nothing to shard
            return build_text_encoder(cfg, self.device, dtype)
        with torch.device("meta"):
            encoder = build_text_encoder(cfg, torch.device("meta"), dtype, structure_only=True)
        full_sd, error = None, None
        if self.dist.rank == 0:
            try:
                full_sd = build_text_encoder(cfg, torch.device("cpu"), dtype).state_dict()
            except (UserError, OSError) as err:
                error = err if isinstance(err, UserError) else UserError(f"text encoder: {err}")
        raise_user_error_everywhere(error)
        shard_model(
            encoder,
            self.mesh,
            block_lists=("encoder.encoder.block",),
            mixed_precision=False,
            cpu_offload=cfg.text_encoder_cpu_offload,
        )
        home = torch.device("cpu") if cfg.text_encoder_cpu_offload else self.device
        load_full_state_dict(encoder, full_sd, device=home)
        return encoder.eval()

    def _build_dit(self, role: str, trainable: bool, gan_head: bool = False) -> WanDiffusionWrapper:
        cfg = self.cfg
        if role == "real_score":
            fixed = fixed_real_score(cfg, self.device)
            if fixed is not None:  # e.g. closed form: no weights, nothing to shard
                return fixed
        lora = lora_spec(cfg, role) if trainable else None
        with torch.device("meta"):
            wrapper = dit_structure(cfg, role, gan_head)
            enable_sequence_parallel(wrapper.model, self.parallel, f"{role}_model")  # checks the heads
            if lora is not None:  # adapters live inside the blocks, so FSDP2 shards them with their block
                add_lora(wrapper.model, lora)
        full_sd, error = None, None
        if self.dist.rank == 0:
            # Rank 0 alone reads the weights (64 ranks must not each read 14B weights).
            try:
                lora_seed = micro_seed(self.seed, 0, f"{role}/lora", 0)
                host = build_dit(cfg, role, seed=self.seed, gan_head=gan_head, lora=lora, lora_seed=lora_seed)
                full_sd = host.state_dict()
                del host
            except (UserError, OSError) as err:
                error = err if isinstance(err, UserError) else UserError(f"{role} weights: {err}")
        raise_user_error_everywhere(error)
        set_trainable(wrapper, cfg, role, trainable, lora)
        if self.shard_dits:
            shard_model(
                wrapper,
                self.mesh,
                block_lists=("model.blocks",),
                mixed_precision=cfg.mixed_precision,
                reshard_after_forward=reshard_after_forward_for(cfg.sharding_strategy),
            )
        load_full_state_dict(wrapper, full_sd, device=self.device)
        if cfg.compile:  # per block, after sharding (FSDP2's hooks stay outside the compiled region)
            for block in wrapper.model.blocks:
                block.compile()
        if not trainable:
            wrapper.eval()
        return wrapper

    def _build_data(self) -> None:
        """Open and check the data on every rank; any problem is one `UserError` on every rank."""
        error = None
        try:
            self._open_data()
        except UserError as err:
            error = err
        except (OSError, ValueError) as err:  # unreadable file, bad prompt file, bad rows
            error = UserError(f"data_path={self.cfg.data_path!r}: {err}")
        raise_user_error_everywhere(error)
        self.sampler = StatefulDistributedSampler(
            len(self.dataset),
            self.parallel.dp_rank,
            self.parallel.dp_size,
            shuffle=True,
            seed=self.seed,
            drop_last=True,
        )
        self.loader = infinite_loader(self.dataset, self.sampler, self.cfg.batch_size)
        self._negative: dict[int, torch.Tensor] = {}

    def _open_data(self) -> None:
        cfg = self.cfg
        if cfg.data_path is None:
            raise UserError(
                "data_path is not set: a prompt file (dmd/sid) or an LMDB directory (gan/ode/diffusion/causvid)"
            )
        f, c, h, w = cfg.latent_shape
        if cfg.trainer in ("dmd", "sid") and not cfg.i2v:  # i2v: the first frame comes from video latents
            dataset = TextDataset(cfg.data_path)
        elif cfg.trainer == "ode":
            dataset = ODERegressionLMDBDataset(cfg.data_path, max_pair=cfg.max_pair)
            check_row_shape(
                dataset, (len(cfg.denoising_step_list), f, c, h, w), "ode_latent [K+1, F, C, H, W]"
            )
        else:
            dataset = LatentLMDBDataset(cfg.data_path, with_image_latent=cfg.i2v)
            # i2v DMD/SiD read only the first latent frame of each clip: any clip length will do
            frames = None if cfg.trainer in ("dmd", "sid") else f
            check_row_shape(dataset, (frames, c, h, w), "clean_latent [F, C, H, W]")
        self.dataset = dataset

    def _checkpoint_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "generator": ModelState(self.generator, self.optimizers["generator"]),
            "trainer": ScalarState(self.state),
            "sampler": ScalarState(self.sampler),
            "lr_generator": self.lr_schedulers["generator"],
        }
        if self.critic is not None:
            state["critic"] = ModelState(self.critic, self.optimizers["critic"])
            state["lr_critic"] = self.lr_schedulers["critic"]
        for rate, name in ema_entry_names(list(self.emas)).items():
            state[name] = self.emas[rate]
        if self.warmup_optimizer is not None:
            state["critic_warmup_optim"] = OptimizerState(self.critic, self.warmup_optimizer)
        return state

    # ------------------------------------------------------------------------------------ batches
    @torch.no_grad()
    def _next_batch(self) -> dict[str, torch.Tensor]:
        raw = next(self.loader)
        prompts = list(raw["prompts"])
        batch: dict[str, torch.Tensor] = {
            "prompt_embeds": self.text_encoder(prompts)["prompt_embeds"].to(self.device, self.latent_dtype)
        }
        b = len(prompts)
        if b not in self._negative:  # one embedding per batch size (upstream cached the first only)
            neg = self.text_encoder([self.cfg.negative_prompt])["prompt_embeds"]
            self._negative[b] = neg.to(self.device, self.latent_dtype).expand(b, -1, -1).contiguous()
        batch["negative_prompt_embeds"] = self._negative[b]
        for key in ("clean_latent", "ode_latent", "image_latent"):
            if key in raw:
                batch[key] = raw[key].to(self.device, self.latent_dtype)
        return batch

    # ------------------------------------------------------------------------------------ steps
    def _optimizer_step(self, role: str) -> dict[str, float]:
        cfg, step = self.cfg, self.state.step
        module = self.generator if role == "generator" else self.critic
        warming_up = role == "critic" and self._in_discriminator_warmup()
        optimizer = self.warmup_optimizer if warming_up else self.optimizers[role]
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
            head = {id(p) for p in self.head_params}
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
            self.lr_schedulers[role].step()
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
        if cfg.sample_every and self.state.step % cfg.sample_every == 0 and not self.no_visualize:
            self._log_samples()
        self._check_divergence()
        stop = self._agreed_stop()
        if not self.no_save and (self.state.step % cfg.log_iters == 0 or stop):
            self.save()
        if not stop and self.state.step % cfg.gc_interval == 0:
            gc.collect()
        return stop

    def _check_divergence(self) -> None:
        """Stop after `max_nan_skips` consecutive skipped steps: the run is not coming back."""
        streak = self.state.nan_streak
        if streak < self.cfg.max_nan_skips:
            return
        latest = self.checkpointer.latest() if self.dist.rank == 0 else None
        latest = broadcast_object(latest)
        kept = f"the latest checkpoint ({latest[1]}) is the last good one" if latest else "no checkpoint"
        raise TrainingDivergedError(
            f"stopping at step {self.state.step}: the last {streak} steps were all skipped because a "
            f"loss or gradient was not finite (max_nan_skips={self.cfg.max_nan_skips}); {kept}. "
            "Lower the learning rates (lr, lr_critic) or check the data and weights"
        )

    def _in_discriminator_warmup(self) -> bool:
        return self.warmup_optimizer is not None and self.state.step < self.cfg.discriminator_warmup_steps

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

    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def _agreed_stop(self) -> bool:
        """All ranks stop at the same step if any rank got SIGTERM/SIGUSR1 (cluster pre-emption)."""
        signals = torch.zeros(self.dist.world_size, dtype=torch.int64, device=self.device)
        signals[self.dist.rank] = self._stop_signal or 0
        torch.distributed.all_reduce(signals)  # each rank's own signal number in its slot
        received = {rank: int(s) for rank, s in enumerate(signals.tolist()) if s}
        if received:
            who = ", ".join(f"rank {r}: {signal.Signals(s).name}" for r, s in received.items())
            logger.info("stopping at step %d on signal (%s)", self.state.step, who)
        return bool(received)

    @torch.no_grad()
    def _log_samples(self) -> None:
        """Generate a few videos with the current (EMA when active) generator; every rank takes part."""
        from pipeline.from_config import inference_pipeline

        cfg = self.cfg
        pipe = inference_pipeline(cfg, self.generator, self.vae, num_max_frames=cfg.image_or_video_shape[1])
        items = [self.dataset[i] for i in range(min(2, len(self.dataset)))]
        prompts = [item["prompts"] for item in items]
        cond = {
            "prompt_embeds": self.text_encoder(prompts)["prompt_embeds"].to(self.device, self.latent_dtype)
        }
        f, c, h, w = cfg.latent_shape
        image = None  # i2v: the samples continue the data's first frames (ODE data: the clean end's)
        if cfg.i2v:
            firsts = [
                item["image_latent"] if "image_latent" in item else item["ode_latent"][-1, :1]
                for item in items
            ]
            image = torch.stack(firsts).to(self.device, self.latent_dtype)
            f -= 1
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(len(prompts), f, c, h, w, generator=g).to(self.device, self.latent_dtype)
        self.generator.eval()
        try:
            rate = cfg.sample_ema_weight if cfg.sample_ema_weight is not None else next(iter(self.emas), None)
            ema = self.emas.get(rate) if self.state.ema_active else None
            with ema.swap_into(self.generator) if ema is not None else contextlib.nullcontext():
                out = pipe.inference(noise, cond, initial_latent=image, generator=g)
        finally:
            self.generator.train()
        if out.videos is not None:
            for i, video in enumerate(out.videos):
                self.metrics.log_video(self.state.step, f"sample{i}", video.float(), fps=16)

    def cleanup(self, ok: bool = True) -> None:
        if hasattr(self, "metrics"):
            self.metrics.close()
        # Release everything that holds the device mesh before the process group goes (see
        # utils.distributed.cleanup); the Trainer object itself may outlive this call.
        for name in ("objective", "generator", "real_score", "critic", "text_encoder", "vae", "emas",
                     "optimizers", "warmup_optimizer", "lr_schedulers", "head_params", "mesh", "checkpointer", "parallel"):  # fmt: skip
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
