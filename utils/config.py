"""The one typed training configuration: every default lives in `TrainConfig`; YAML files and
`key=value` command-line arguments are overrides.

Key names and meanings follow upstream Self-Forcing (`configs/default_config.yaml` and
`configs/self_forcing_dmd.yaml`, see the spec §10) so its YAML files load unchanged:

* `trainer: score_distillation` + `distribution_loss: dmd|sid|causvid` becomes `trainer: dmd|sid|causvid`;
* `real_name` / `fake_name` / `model_kwargs.model_name` (upstream folder names such as "Wan2.1-T2V-14B")
  select the model presets `real_score_model` / `fake_score_model` / `generator_model`;
* keys upstream reads but never uses (`causal`, `ckpt_step`, `height`, ...) are dropped with a warning;
* `wandb_key` / `wandb_host` (credentials) are accepted and ignored with one warning: credentials
  come from the environment (`WANDB_API_KEY`, `WANDB_BASE_URL`), never from a file.

Unknown keys are errors that name the key, its source and the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from utils.components import COMPONENT_KEY, is_component, resolve
from utils.errors import ConfigError
from utils.lora import LORA_ROLES, parse_names

logger = logging.getLogger(__name__)

# Wan2.1's default negative prompt (used as the unconditional text for CFG upstream).
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

TRAINERS = ("dmd", "sid", "gan", "ode", "diffusion", "causvid", "teacher_regression")
# Objectives with an image-to-video recipe: rollouts from the data's first frame, or (ODE) that frame clean.
I2V_TRAINERS = ("dmd", "sid", "gan", "ode")
# Must agree with `wan.WanConfig.preset` (utils may not import wan). Any other network is a component.
MODEL_PRESETS = ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "tiny")
ROLE_KEYS = ("generator_model", "real_score_model", "fake_score_model")
COMPONENT_ONLY_KEYS = ("text_encoder", "vae")
SHARDING_STRATEGIES = ("full", "hybrid", "hybrid_full", "hybrid_zero2", "none", "no_shard")
DENOISING_LOSS_TYPES = ("flow", "x0")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class ModelKwargs:
    """Generator construction arguments (upstream `model_kwargs`)."""

    timestep_shift: float = 5.0  # shift of the generator's flow-matching grid (step warping, §3)
    local_attn_size: int = -1  # rolling KV window in latent frames; -1 = attend to every frame
    sink_size: int = 0  # frames at the head of the window that are never evicted
    # WanConfig fields of the generator that differ from its preset, e.g. {pos_embed_frames: 4} (the
    # critic and teacher keep theirs). Weights load as usual: a change that alters a weight's shape fails.
    wan_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """Every training option with its default. Field comments say what each key does."""

    # --- run -------------------------------------------------------------------------------------
    trainer: str = "dmd"  # objective: one of TRAINERS
    logdir: str | None = None  # run directory (checkpoints, metrics, samples); train.py may set it
    resume: bool = True  # continue from the latest complete checkpoint in logdir
    max_steps: int = 2000  # stop after this many optimisation steps (upstream loops forever)
    seed: int = 0  # base seed; 0 = rank 0 draws one and broadcasts it; each rank uses seed + rank
    log_iters: int = 50  # checkpoint interval in steps (upstream name)
    keep_last_checkpoints: int = 3  # keep the newest K complete checkpoints; 0 keeps all
    sample_every: int = 0  # steps between logged sample videos; 0 disables visualisation
    gc_interval: int = 100  # steps between gc.collect() + cache emptying

    # --- batch -----------------------------------------------------------------------------------
    batch_size: int = 1  # samples per rank per micro-batch
    total_batch_size: int | None = None  # global batch = batch_size x (world_size / sp_size) x accumulation
    gradient_accumulation_steps: int | None = None  # micro-batches per optimiser step (derived if None)

    # --- data ------------------------------------------------------------------------------------
    data_path: str | None = None  # prompt .txt file, or LMDB directory for latent/ODE data
    negative_prompt: str = WAN_NEGATIVE_PROMPT  # unconditional text for classifier-free guidance
    # Image-to-video (dmd/sid/gan/ode; needs independent_first_frame): the first latent frame of each
    # data clip (video-latent LMDB; ODE: the trajectory's clean end) is given, the rest generated.
    i2v: bool = False
    max_pair: int | None = None  # cap on ODE pairs read from the LMDB; None = all

    # --- models and weights ----------------------------------------------------------------------
    # A role is a preset (MODEL_PRESETS) or a component {_component_: dotted.path, **kwargs}
    # (utils/components.py): a factory of a WanConfig (a Wan network of those sizes; without a
    # checkpoint it starts from its seeded init), or, for real_score_model, of a fixed module
    # (noisy, t, context) -> (flow, x0), e.g. a closed-form teacher, used as it is.
    generator_model: Any = "wan2.1-t2v-1.3b"  # causal student
    real_score_model: Any = "wan2.1-t2v-14b"  # frozen teacher
    fake_score_model: Any = "wan2.1-t2v-1.3b"  # trainable critic
    generator_ckpt: str | None = None  # initial generator weights (.pt: "generator" or "model" entry)
    real_score_ckpt: str | None = None  # teacher DiT weights; None allowed only for "tiny" (random)
    fake_score_ckpt: str | None = None  # critic DiT weights; None allowed only for "tiny" (random)
    text_encoder_path: str | None = None  # UMT5 weights and tokenizer; None = tiny random encoder
    vae_path: str | None = None  # Wan VAE weights; None = tiny random VAE
    # Components in place of the paths above: a text encoder (list[str] -> {"prompt_embeds":
    # [B, L, text_dim]}) and a VAE/codec (encode / decode), each built on every rank as it is.
    text_encoder: Any = None
    vae: Any = None
    model_kwargs: ModelKwargs = field(default_factory=ModelKwargs)  # generator construction arguments
    # Latent [B, F, C, H, W]; B is replaced by batch_size, F by the rollout length.
    image_or_video_shape: list[int] = field(default_factory=lambda: [1, 21, 16, 60, 104])

    # --- causal generation -----------------------------------------------------------------------
    num_frame_per_block: int = 3  # latent frames per autoregressive chunk
    independent_first_frame: bool = False  # chunks [1, N, N, ...] instead of [N, N, ...]
    num_training_frames: int = 21  # latent frames rolled out per training sample
    denoising_step_list: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])  # few-step schedule
    warp_denoising_step: bool = False  # map the step list through the shifted grid t = 1000 S(L/1000)
    same_step_across_blocks: bool = True  # one random exit step shared by every chunk
    last_step_only: bool = False  # always exit at the last denoising step
    context_noise: float = 0.0  # timestep of the clean-context KV-cache pass
    teacher_forcing: bool = False  # diffusion/CausVid: condition on the clean sequence
    noise_augmentation_max_timestep: int = 0  # diffusion: max noise level added to the clean context

    # --- distribution matching (DMD / SiD / CausVid) ---------------------------------------------
    guidance_scale: float = 3.0  # teacher CFG, upstream form cond + s (cond - uncond)
    real_guidance_scale: float | None = None  # overrides guidance_scale for the teacher when set
    fake_guidance_scale: float = 0.0  # CFG of the critic in the DMD gradient; 0 = none
    timestep_shift: float = 5.0  # shift used to sample critic / DMD timesteps
    ts_schedule: bool = False  # lower bound of critic t = the rollout's denoised_timestep_to
    ts_schedule_max: bool = False  # upper bound of critic t = the rollout's denoised_timestep_from
    min_score_timestep: int = 0  # lower bound of critic t when ts_schedule is off
    num_train_timestep: int = 1000  # T of the flow-matching process
    denoising_loss_type: str = "flow"  # critic's (and teacher_regression's) loss target: "flow" or "x0"
    sid_alpha: float = 1.0  # SiD alpha
    dfake_gen_update_ratio: int = 5  # critic steps per generator step

    # --- GAN -------------------------------------------------------------------------------------
    num_class: int = 1  # outputs of the discriminator classifier head
    concat_time_embeddings: bool = False  # append the time embedding to the classifier input
    gan_tap_layers: list[int] | None = (
        None  # critic blocks the GAN head reads; None = upstream's relative depths
    )
    relativistic_discriminator: bool = False  # relativistic GAN losses
    critic_timestep_shift: float | None = None  # shift for GAN noise levels; None = timestep_shift
    gan_g_weight: float = 1e-2  # weight of the generator's GAN loss
    gan_d_weight: float = 1e-2  # weight of the discriminator's GAN loss
    r1_weight: float = 0.0  # R1 (real) finite-difference regulariser weight
    r2_weight: float = 0.0  # R2 (fake) finite-difference regulariser weight
    r1_sigma: float = 0.01  # perturbation size of R1
    r2_sigma: float = 0.01  # perturbation size of R2
    discriminator_lr_multiplier: float = 1.0  # LR multiplier of the discriminator heads
    discriminator_warmup_steps: int = 0  # steps training only the discriminator heads

    # --- optimisation ----------------------------------------------------------------------------
    lr: float = 2e-6  # generator AdamW learning rate
    lr_critic: float = 4e-7  # critic (fake score / discriminator) AdamW learning rate
    beta1: float = 0.0  # generator AdamW beta1
    beta2: float = 0.999  # generator AdamW beta2
    beta1_critic: float = 0.0  # critic AdamW beta1
    beta2_critic: float = 0.999  # critic AdamW beta2
    weight_decay: float = 0.01  # AdamW weight decay (both optimisers)
    lr_warmup_steps: int = 0  # linear LR warm-up steps, then lr_schedule
    # after the warm-up: constant | linear | cosine decay to lr_min | step (drop to lr_min at lr_decay_start)
    lr_schedule: str = "constant"
    # optimizer step the decay (or drop) starts at; None = right after the warm-up
    lr_decay_start: int | None = None
    lr_decay_steps: int | None = None  # optimizer steps of the decay; None = max_steps - its start
    lr_min: float = 0.0  # generator LR at the end of a linear/cosine decay, or after a step
    lr_min_critic: float = 0.0  # critic LR at the end of a linear/cosine decay, or after a step
    max_grad_norm_generator: float = 10.0  # gradient clipping of the generator
    max_grad_norm_critic: float = 10.0  # gradient clipping of the critic
    # EMA decay of the generator; a list keeps one EMA per rate ([0.99, 0.999]); 0 disables EMA
    ema_weight: Any = 0.99
    sample_ema_weight: float | None = None  # EMA rate used for sample videos; None = the first rate
    ema_start_step: int = 200  # EMA is (re)initialised from the generator at this step
    max_nan_skips: int = 20  # stop with an error after this many consecutive skipped (non-finite) steps

    # --- systems ---------------------------------------------------------------------------------
    mixed_precision: bool = True  # bf16 parameters/compute, fp32 master weights and reductions
    sharding_strategy: str = "full"  # FSDP2 layout: full | hybrid (= hybrid_full) | hybrid_zero2 | none
    # Ulysses sequence parallelism: groups of sp_size consecutive ranks share each video, every rank holds
    # 1/sp_size of its DiT tokens (world_size = dp x sp_size; heads must divide). 1 = off
    sp_size: int = 1
    gradient_checkpointing: bool = True  # per-block activation checkpointing (alias activation_checkpointing)
    text_encoder_cpu_offload: bool = False  # keep the sharded text encoder's parameters on the CPU
    compile: bool = False  # torch.compile each transformer block
    gradient_checkpointing_offload: bool = (
        False  # checkpointed blocks' saved inputs go to (pinned) CPU memory
    )

    # --- LoRA (DiffSynth-Studio's option names) --------------------------------------------------
    lora_base_model: Any = None  # train adapters instead of weights: "generator", "fake_score" or both
    lora_target_modules: Any = "q,k,v,o,ffn.0,ffn.2"  # linear layers to adapt (suffixes; comma list)
    lora_rank: int = 32  # adapter rank r
    lora_alpha: float | None = None  # the update is scaled by lora_alpha / lora_rank; None = lora_rank
    lora_checkpoint: str | None = None  # start from saved adapters (peft folder or LoRA safetensors)
    preset_lora_path: str | None = None  # a LoRA merged into the base weights before training

    # --- logging ---------------------------------------------------------------------------------
    wandb_mode: str = "offline"  # offline | online | disabled; credentials only from the environment
    wandb_project: str | None = None  # wandb project (upstream key)
    wandb_entity: str | None = None  # wandb entity (upstream key)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """Latent geometry `(F, C, H, W)` from `image_or_video_shape` ([B, F, C, H, W])."""
        _, f, c, h, w = self.image_or_video_shape
        return f, c, h, w


# ------------------------------------------------------------------------------------------------
# Upstream compatibility tables
# ------------------------------------------------------------------------------------------------

# Read (or shipped) upstream but without effect there; dropped with a warning.
_IGNORED_UPSTREAM_KEYS = {
    "causal": "stored but unused upstream",
    "ckpt_step": "unused upstream",
    "prompt_name": "unused upstream (evaluation leftover)",
    "prompt_path": "unused upstream (evaluation leftover)",
    "eval_first_n": "unused upstream (evaluation leftover)",
    "num_samples": "unused upstream (evaluation leftover)",
    "height": "unused upstream; geometry comes from image_or_video_shape",
    "width": "unused upstream; geometry comes from image_or_video_shape",
    "num_frames": "unused upstream; geometry comes from image_or_video_shape",
    "generator_fsdp_wrap_strategy": "FSDP2 here always shards one unit per transformer block",
    "real_score_fsdp_wrap_strategy": "FSDP2 here always shards one unit per transformer block",
    "fake_score_fsdp_wrap_strategy": "FSDP2 here always shards one unit per transformer block",
    "text_encoder_fsdp_wrap_strategy": "FSDP2 here always shards one unit per transformer block",
}
# Upstream keys accepted only with the value that is the behaviour here.
_FIXED_UPSTREAM_KEYS = {
    "backward_simulation": (True, "training always rolls the generator out (Self Forcing)"),
    "load_raw_video": (False, "encode videos into an LMDB of latents first"),
}
# Upstream's wandb login keys: shipped as placeholders in every upstream YAML, so accepted, but
# ignored (one warning): credentials come from the environment only.
_CREDENTIAL_KEYS = ("wandb_key", "wandb_host")
_REJECTED_KEYS = {
    "gen_lr": "upstream's GAN name for the generator learning rate; use 'lr'",
    "critic_lr": "upstream's GAN name for the critic learning rate; use 'lr_critic'",
}
_ALIASES = {"activation_checkpointing": "gradient_checkpointing"}
# Upstream model folder names -> which preset field they select.
_MODEL_NAME_KEYS = {"real_name": "real_score_model", "fake_name": "fake_score_model"}
_UPSTREAM_TRAINER = "score_distillation"
_DISTRIBUTION_LOSSES = ("dmd", "sid", "causvid")
_COMPAT_KEYS = {
    "distribution_loss",
    *_MODEL_NAME_KEYS,
    *_IGNORED_UPSTREAM_KEYS,
    *_FIXED_UPSTREAM_KEYS,
    *_ALIASES,
    *_CREDENTIAL_KEYS,
}


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Build the config: `TrainConfig` defaults <- YAML file at `path` <- `key=value` overrides.

    Overrides use dotted names for nested keys (`model_kwargs.local_attn_size=6`) and YAML values
    (`denoising_step_list=[1000,500]`, `real_score_ckpt=null`). Raises `ConfigError` naming the
    offending key and where it came from.
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    if path is not None:
        layers.append((f"config file {str(path)!r}", _read_yaml(Path(path))))
    if overrides:
        layers.append(("command-line overrides", _parse_overrides(overrides)))

    merged: dict[str, Any] = {}
    for source, layer in layers:
        _check_keys(layer, TrainConfig, source, prefix="")
        merged = _deep_merge(merged, layer)
    merged = _apply_upstream_compat(merged)

    schema = OmegaConf.structured(TrainConfig)
    OmegaConf.set_struct(schema, True)
    OmegaConf.set_struct(schema.model_kwargs.wan_config, False)  # free-form: checked against WanConfig later
    try:
        cfg: TrainConfig = OmegaConf.to_object(OmegaConf.merge(schema, merged))
    except OmegaConfBaseException as err:
        sources = " + ".join(source for source, _ in layers) or "defaults"
        raise ConfigError(f"invalid value in {sources}: {err}") from err
    validate_config(cfg)
    return cfg


def save_config(cfg: TrainConfig, run_dir: str | Path) -> Path:
    """Write the fully merged `cfg` to `<run_dir>/config.yaml` (call on rank 0) and return the path."""
    out = Path(run_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)), encoding="utf-8")
    return out


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain nested dict of `cfg` (for wandb and logs)."""
    return dataclasses.asdict(cfg)


def resolve_accumulation(cfg: TrainConfig, world_size: int) -> int:
    """Fix the gradient-accumulation count so `total_batch_size = batch_size * world_size * accum`.

    `world_size` counts data-parallel replicas: the number of processes divided by `sp_size` (the
    ranks of a sequence-parallel group share one batch). Either key may be given (the other is
    derived) or both (they must agree); with neither, accumulation is 1. Writes both resolved values
    back into `cfg` and returns the count.
    """
    per_step = cfg.batch_size * world_size
    accum = cfg.gradient_accumulation_steps
    if cfg.total_batch_size is None:
        accum = 1 if accum is None else accum
    else:
        if cfg.total_batch_size % per_step != 0:
            raise ConfigError(
                f"total_batch_size={cfg.total_batch_size} is not a multiple of batch_size x world_size = "
                f"{cfg.batch_size} x {world_size} = {per_step}; change total_batch_size or the number of ranks"
            )
        derived = cfg.total_batch_size // per_step
        if accum is not None and accum != derived:
            raise ConfigError(
                f"gradient_accumulation_steps={accum} disagrees with total_batch_size={cfg.total_batch_size} "
                f"= batch_size {cfg.batch_size} x world_size {world_size} x {derived}; set only one of them"
            )
        accum = derived
    if accum < 1:
        raise ConfigError(f"gradient_accumulation_steps must be >= 1, got {accum}")
    cfg.gradient_accumulation_steps = accum
    cfg.total_batch_size = per_step * accum
    return accum


def validate_config(cfg: TrainConfig) -> None:
    """Check choices and ranges that the type system cannot express; raise `ConfigError`."""
    _validate_components(cfg)
    choices = {
        "trainer": (cfg.trainer, TRAINERS),
        **{
            key: (getattr(cfg, key), MODEL_PRESETS)
            for key in ROLE_KEYS
            if not is_component(getattr(cfg, key))
        },
        "sharding_strategy": (cfg.sharding_strategy, SHARDING_STRATEGIES),
        "denoising_loss_type": (cfg.denoising_loss_type, DENOISING_LOSS_TYPES),
        "wandb_mode": (cfg.wandb_mode, WANDB_MODES),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}{_suggest(str(value), allowed)}")
    _reject_non_finite(cfg)
    positive = {
        "batch_size": cfg.batch_size,
        "max_nan_skips": cfg.max_nan_skips,
        "max_steps": cfg.max_steps,
        "log_iters": cfg.log_iters,
        "num_frame_per_block": cfg.num_frame_per_block,
        "num_training_frames": cfg.num_training_frames,
        "dfake_gen_update_ratio": cfg.dfake_gen_update_ratio,
        "num_train_timestep": cfg.num_train_timestep,
        "gc_interval": cfg.gc_interval,
        "sp_size": cfg.sp_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    non_negative = {
        "keep_last_checkpoints": cfg.keep_last_checkpoints,
        "sample_every": cfg.sample_every,
        "lr_warmup_steps": cfg.lr_warmup_steps,
        "ema_start_step": cfg.ema_start_step,
        "model_kwargs.sink_size": cfg.model_kwargs.sink_size,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    rates = ema_rates(cfg)
    if cfg.sample_ema_weight is not None and cfg.sample_ema_weight not in rates:
        raise ConfigError(f"sample_ema_weight={cfg.sample_ema_weight} is not one of ema_weight {list(rates)}")
    _validate_lr_schedule(cfg)
    _validate_lora(cfg)
    if cfg.gradient_checkpointing_offload and not cfg.gradient_checkpointing:
        raise ConfigError(
            "gradient_checkpointing_offload=true needs gradient_checkpointing=true (it offloads the "
            "inputs that checkpointed blocks keep for backward)"
        )
    if len(cfg.image_or_video_shape) != 5 or min(cfg.image_or_video_shape) < 1:
        raise ConfigError(
            f"image_or_video_shape must be 5 positive ints [B, F, C, H, W], got {cfg.image_or_video_shape}"
        )
    steps = cfg.denoising_step_list
    if not steps or any(not 0 <= s <= cfg.num_train_timestep for s in steps):
        raise ConfigError(
            f"denoising_step_list must be non-empty within [0, {cfg.num_train_timestep}], got {steps}"
        )
    if any(a <= b for a, b in zip(steps, steps[1:])):
        raise ConfigError(f"denoising_step_list must be strictly decreasing, got {steps}")
    if cfg.i2v and cfg.trainer not in I2V_TRAINERS:
        raise ConfigError(
            f"i2v=true applies to trainer in {list(I2V_TRAINERS)} (rollouts start from the data's first "
            f"frame; ODE regression takes it clean), not trainer={cfg.trainer!r}"
        )
    if cfg.i2v and not cfg.independent_first_frame:
        raise ConfigError(
            "i2v=true needs independent_first_frame=true: the image is the first latent frame and is "
            "cached as a block of its own ([1, N, N, ...]), in training as at inference"
        )
    window = cfg.model_kwargs.local_attn_size
    if window != -1 and not cfg.model_kwargs.sink_size < window:
        raise ConfigError(
            f"model_kwargs.local_attn_size={window} must be -1 (global) or larger than "
            f"model_kwargs.sink_size={cfg.model_kwargs.sink_size}"
        )


def _validate_components(cfg: TrainConfig) -> None:
    """Each component's path imports and takes its keyword arguments (what the object can do is
    checked where its role is built): before anything is built or trained."""
    for key in (*ROLE_KEYS, *COMPONENT_ONLY_KEYS):
        value = getattr(cfg, key)
        if is_component(value):
            resolve(key, value)
        elif isinstance(value, Mapping):
            raise ConfigError(
                f"{key}: a mapping must name its factory with {COMPONENT_KEY}, got keys {sorted(value)}"
            )
        elif key in COMPONENT_ONLY_KEYS and value is not None:
            raise ConfigError(f"{key}={value!r}: expected {{{COMPONENT_KEY}: dotted.path, ...}} or null")


def ema_rates(cfg: TrainConfig) -> tuple[float, ...]:
    """The EMA decays of the run: `ema_weight` as a tuple; () when EMA is off (`ema_weight: 0`)."""
    value = cfg.ema_weight
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        rates = tuple(float(v) for v in values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"ema_weight must be a number or a list of numbers, got {value!r}") from err
    if rates == (0.0,):
        return ()
    if not rates or any(not 0.0 < r < 1.0 for r in rates) or len(set(rates)) != len(rates):
        raise ConfigError(
            f"ema_weight must be 0 (no EMA), a decay in (0, 1) or a list of distinct decays in (0, 1), got {value!r}"
        )
    return rates


LR_SCHEDULES = ("constant", "linear", "cosine", "step")


def lr_decay_begin(lr_decay_start: int | None, lr_warmup_steps: int) -> int:
    """Optimizer step a decay (or a step's drop) starts at: `lr_decay_start`, else the end of the warm-up."""
    return lr_warmup_steps if lr_decay_start is None else int(lr_decay_start)


def lr_decay_horizon(
    lr_decay_steps: int | None, max_steps: int, lr_warmup_steps: int, lr_decay_start: int | None = None
) -> int:
    """Optimizer steps a linear/cosine LR decay spans: `lr_decay_steps`, else the steps after its start."""
    return int(lr_decay_steps or max(1, max_steps - lr_decay_begin(lr_decay_start, lr_warmup_steps)))


def _validate_lr_schedule(cfg: TrainConfig) -> None:
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(
            f"lr_schedule={cfg.lr_schedule!r} is not one of {list(LR_SCHEDULES)}{_suggest(cfg.lr_schedule, LR_SCHEDULES)}"
        )
    if cfg.lr_decay_steps is not None and cfg.lr_decay_steps < 1:
        raise ConfigError(f"lr_decay_steps must be >= 1 (or null), got {cfg.lr_decay_steps}")
    if cfg.lr_decay_start is not None and cfg.lr_decay_start < cfg.lr_warmup_steps:
        raise ConfigError(
            f"lr_decay_start={cfg.lr_decay_start} falls inside the warm-up (lr_warmup_steps={cfg.lr_warmup_steps}); "
            "it must be >= lr_warmup_steps (or null: right after the warm-up)"
        )
    if cfg.lr_schedule == "step" and cfg.lr_decay_start is None:
        raise ConfigError(
            "lr_schedule=step needs lr_decay_start: the optimizer step at which the LR drops to lr_min"
        )
    for key, low, high in (
        ("lr_min", cfg.lr_min, cfg.lr),
        ("lr_min_critic", cfg.lr_min_critic, cfg.lr_critic),
    ):
        if low < 0 or (cfg.lr_schedule != "constant" and low > high):
            raise ConfigError(f"{key}={low} must be in [0, {high}] (the peak learning rate)")


def lora_roles(cfg: TrainConfig) -> tuple[str, ...]:
    """Networks that train LoRA adapters: `lora_base_model` as a tuple (comma list or YAML list)."""
    return parse_names(cfg.lora_base_model)


def lora_targets(cfg: TrainConfig) -> tuple[str, ...]:
    """`lora_target_modules` as a tuple (comma list or YAML list)."""
    return parse_names(cfg.lora_target_modules)


def _validate_lora(cfg: TrainConfig) -> None:
    roles = lora_roles(cfg)
    bad = [r for r in roles if r not in LORA_ROLES]
    if bad:
        raise ConfigError(
            f"lora_base_model names {bad}; choose from {list(LORA_ROLES)} (comma-separated for both)"
        )
    if not roles:
        for key in ("lora_checkpoint", "preset_lora_path"):
            if getattr(cfg, key) is not None:
                raise ConfigError(f"{key} is set but lora_base_model is not (which network gets the LoRA?)")
        return
    if cfg.lora_rank < 1:
        raise ConfigError(f"lora_rank must be >= 1, got {cfg.lora_rank}")
    if not lora_targets(cfg):
        raise ConfigError("lora_target_modules is empty")
    if "fake_score" in roles and not NEEDS_CRITIC[cfg.trainer]:
        raise ConfigError(f"lora_base_model includes fake_score but trainer={cfg.trainer!r} has no critic")


# Objectives with a trainable critic (fake score / discriminator).
NEEDS_CRITIC = {
    "dmd": True,
    "sid": True,
    "causvid": True,
    "gan": True,
    "ode": False,
    "diffusion": False,
    "teacher_regression": False,
}


def _reject_non_finite(node: Any, prefix: str = "") -> None:
    """NaN or inf in any number (e.g. `guidance_scale=nan`) would train silently on garbage."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        values = value if isinstance(value, list) else [value]
        if dataclasses.is_dataclass(value):
            _reject_non_finite(value, f"{prefix}{f.name}.")
        elif any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"{prefix}{f.name} must be a finite number, got {value}")


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"config file {str(path)!r} cannot be parsed: {err}") from err
    except Exception as err:  # yaml.YAMLError and friends
        raise ConfigError(f"config file {str(path)!r} cannot be parsed: {err}") from err
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of keys, got {type(loaded).__name__}"
        )
    return loaded


def _parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"command-line override {item!r} is not of the form key=value")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"command-line overrides {list(overrides)} cannot be parsed: {err}") from err


def _suggest(key: str, candidates: Sequence[str] | set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(candidates), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_keys(layer: Mapping[str, Any], schema: type, source: str, prefix: str) -> None:
    """Raise on keys that are neither schema fields nor known upstream keys."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        if key in _REJECTED_KEYS and not prefix:
            raise ConfigError(f"key {dotted!r} in {source} is not accepted: {_REJECTED_KEYS[key]}")
        if (not prefix and key in _COMPAT_KEYS) or (dotted == "model_kwargs.model_name"):
            continue
        if key not in fields:
            valid = set(fields) | (_COMPAT_KEYS if not prefix else set())
            close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {dotted!r} in {source}{hint}")
        nested = _nested_schema(schema, key)
        if nested is not None:
            if not isinstance(value, Mapping):
                raise ConfigError(f"key {dotted!r} in {source} must be a mapping, got {value!r}")
            _check_keys(value, nested, source, prefix=f"{dotted}.")


def _nested_schema(schema: type, key: str) -> type | None:
    """The dataclass type of a nested-config field (e.g. `model_kwargs`), else None."""
    factory = schema.__dataclass_fields__[key].default_factory
    return factory if isinstance(factory, type) and dataclasses.is_dataclass(factory) else None


def _deep_merge(base: dict[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in new.items():
        if is_component(value):  # another factory: the old one's keyword arguments do not carry over
            out[key] = dict(value)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _preset_from_upstream_name(key: str, name: str) -> str:
    preset = str(name).lower()
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"{key}={name!r} names no known model; presets are {list(MODEL_PRESETS)}")
    return preset


def _apply_upstream_compat(raw: dict[str, Any]) -> dict[str, Any]:
    """Rewrite upstream-only keys onto the schema (see the module docstring)."""
    raw = dict(raw)
    credentials = sorted(k for k in _CREDENTIAL_KEYS if k in raw)
    for key in credentials:
        raw.pop(key)
    if credentials:
        logger.warning(
            "config keys %s ignored: wandb credentials come from the environment "
            "(WANDB_API_KEY, WANDB_BASE_URL), never from a config file",
            credentials,
        )
    for key, reason in _IGNORED_UPSTREAM_KEYS.items():
        if key in raw:
            logger.warning("config key %r ignored: %s", key, reason)
            raw.pop(key)
    for key, (required, reason) in _FIXED_UPSTREAM_KEYS.items():
        if key in raw and raw.pop(key) != required:
            raise ConfigError(f"{key} must be {required} here: {reason}")
    for alias, target in _ALIASES.items():
        if alias in raw:
            value = raw.pop(alias)
            if target in raw and raw[target] != value:
                raise ConfigError(
                    f"{alias}={value!r} contradicts {target}={raw[target]!r} (they are aliases)"
                )
            raw[target] = value

    # Upstream selects the objective with trainer=score_distillation + distribution_loss.
    loss = raw.pop("distribution_loss", None)
    trainer = raw.get("trainer")
    if trainer == _UPSTREAM_TRAINER:
        raw["trainer"] = loss if loss is not None else "dmd"
    elif loss is not None and trainer not in (None, loss):
        raise ConfigError(f"distribution_loss={loss!r} contradicts trainer={trainer!r}; set only trainer")
    elif loss is not None:
        raw["trainer"] = loss
    if loss is not None and loss not in _DISTRIBUTION_LOSSES:
        raise ConfigError(f"distribution_loss={loss!r} is not one of {list(_DISTRIBUTION_LOSSES)}")

    model_kwargs = dict(raw.get("model_kwargs") or {})
    names = {k: raw.pop(k) for k in _MODEL_NAME_KEYS if k in raw}
    if "model_name" in model_kwargs:
        names["model_kwargs.model_name"] = model_kwargs.pop("model_name")
        raw["model_kwargs"] = model_kwargs
    targets = {**_MODEL_NAME_KEYS, "model_kwargs.model_name": "generator_model"}
    for key, name in names.items():
        target = targets[key]
        preset = _preset_from_upstream_name(key, name)
        if target in raw and raw[target] != preset:
            raise ConfigError(f"{key}={name!r} contradicts {target}={raw[target]!r}")
        raw[target] = preset
    return raw
