"""Build the networks of a run from its config: structure and weights are separate steps.

`make_*` functions build structure on the current default device (the trainer calls them under
`torch.device("meta")`, shards, then loads); `*_weights` functions read the full state dict that
rank 0 loads and broadcasts. Weight paths come from the config only; a tiny preset without a path
gets seeded random weights (the toy networks), any other preset without a path is an error.

A role may also be a component (`{_component_: dotted.path, **kwargs}`, utils/components.py): a
factory of a `WanConfig` (a Wan network of those sizes, built like a preset's; without a checkpoint
it starts from its seeded initialisation), or for the real score a fixed module with the wrapper's
interface (`fixed_real_score`). The text encoder and the VAE may be components too. What a
component returns is checked here, before anything trains: one `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from pipeline.from_config import step_list
from utils.components import instantiate, is_component
from utils.config import ConfigError, TrainConfig, lora_roles, lora_targets
from utils.lora import LoraSpec, add_lora, load_adapters, merge_lora, train_adapters_only
from utils.scheduler import FlowMatchScheduler
from wan import CausalWanModel, WanConfig, WanDiffusionWrapper, WanModel
from wan.gan_head import add_gan_head
from wan.lora_weights import read_lora
from wan.toy import toy_dit_state_dict, toy_text_encoder, toy_vae
from wan.weights import load_dit_weights, read_dit_weights

if TYPE_CHECKING:  # transformers and diffusers are imported only when a real encoder/VAE is built
    from wan import WanTextEncoder, WanVAE

logger = logging.getLogger(__name__)

ROLES = ("generator", "real_score", "fake_score")


def wan_config(cfg: TrainConfig, role: str) -> WanConfig:
    """The role's network sizes: its preset or its component's WanConfig, for the generator with
    `model_kwargs.wan_config` applied."""
    key = f"{role}_model"
    spec = getattr(cfg, key)
    if not is_component(spec):
        base = WanConfig.preset(spec)
    else:
        base = instantiate(key, spec)
        if not isinstance(base, WanConfig):
            what = "a WanConfig" + (
                " or a fixed module (see fixed_real_score)" if role == "real_score" else ""
            )
            raise ConfigError(
                f"{key}: {spec['_component_']} returned a {type(base).__name__}; the {role} role needs {what}"
            )
    changes = dict(cfg.model_kwargs.wan_config) if role == "generator" else {}
    fields = {f.name for f in dataclasses.fields(WanConfig)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise ConfigError(
            f"model_kwargs.wan_config: {unknown} are not WanConfig fields; choose from {sorted(fields)}"
        )
    try:
        return base.replace(**changes)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model_kwargs.wan_config {changes}: {err}") from err


def fixed_real_score(cfg: TrainConfig, device: torch.device) -> nn.Module | None:
    """The real score when `real_score_model` is a component that builds a module rather than a
    WanConfig (e.g. a closed-form teacher: no weights, nothing to shard or train), in eval mode on
    `device`; else None (a Wan network, built like the other roles). The module must take
    `(noisy [B, F, C, H, W], t [B, F], context [B, L, text_dim])` and return `(flow, x0)`."""
    spec = cfg.real_score_model
    if not is_component(spec):
        return None
    built = instantiate("real_score_model", spec)
    if isinstance(built, WanConfig):
        return None
    if not isinstance(built, nn.Module):
        raise ConfigError(
            f"real_score_model: {spec['_component_']} returned a {type(built).__name__}; the real score "
            "needs a WanConfig or an nn.Module (noisy, t, context) -> (flow, x0)"
        )
    _check_call(built.forward, 3, "real_score_model", spec, "forward(noisy, t, context) -> (flow, x0)")
    return built.to(device).eval().requires_grad_(False)


def _check_call(fn, positional: int, key: str, spec, interface: str) -> None:
    """`fn` accepts `positional` positional arguments, else a ConfigError naming `key` and the interface."""
    try:
        inspect.signature(fn).bind(*range(positional))
    except TypeError as err:
        raise ConfigError(
            f"{key}: {spec['_component_']} lacks the role's interface {interface}: {err}"
        ) from err


def make_dit(cfg: TrainConfig, role: str) -> WanDiffusionWrapper:
    """Structure of one DiT role wrapped for `[B, F, C, H, W]` use (weights uninitialised semantics)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of {ROLES}")
    wcfg = wan_config(cfg, role)
    if role == "generator":
        model: nn.Module = CausalWanModel(
            wcfg,
            num_frame_per_block=cfg.num_frame_per_block,
            local_attn_size=cfg.model_kwargs.local_attn_size,
            sink_size=cfg.model_kwargs.sink_size,
            independent_first_frame=cfg.independent_first_frame,
        )
    else:
        model = WanModel(wcfg)
    scheduler = FlowMatchScheduler(
        shift=cfg.model_kwargs.timestep_shift, num_train_timesteps=cfg.num_train_timestep
    )
    return WanDiffusionWrapper(model, scheduler)


def dit_structure(cfg: TrainConfig, role: str, gan_head: bool = False) -> WanDiffusionWrapper:
    """`make_dit` plus, for the GAN critic, the classification head (on the current default device)."""
    wrapper = make_dit(cfg, role)
    if gan_head:
        add_gan_head(
            wrapper,
            num_class=cfg.num_class,
            concat_time_embeddings=cfg.concat_time_embeddings,
            tap_layers=cfg.gan_tap_layers,
        )
    return wrapper


def build_dit(
    cfg: TrainConfig,
    role: str,
    *,
    seed: int,
    gan_head: bool = False,
    lora: LoraSpec | None = None,
    lora_seed: int = 0,
) -> WanDiffusionWrapper:
    """The whole network of `role` with its weights, on the CPU: what the trainer's rank 0 builds and
    broadcasts. A GAN head starts from the `seed`ed init; LoRA adapters (A from `lora_seed`) are added
    around the loaded base weights (official names first)."""
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        host = dit_structure(cfg, role, gan_head)
    load_dit_weights(host.model, dit_weights(cfg, role))
    if lora is not None:
        add_lora_to_loaded(host.model, cfg, lora, seed=lora_seed)
    return host


def set_trainable(
    wrapper: WanDiffusionWrapper, cfg: TrainConfig, role: str, trainable: bool, lora: LoraSpec | None
) -> None:
    """What `role` trains (everything, only its LoRA adapters, or nothing) and, where gradients flow
    through it, activation checkpointing (`gradient_checkpointing`). Before sharding."""
    wrapper.requires_grad_(trainable)
    if lora is not None:  # the DiT's base weights stay frozen (a GAN head still trains in full)
        train_adapters_only(wrapper.model)
    differentiated = trainable or role in BACKPROP_THROUGH_FROZEN.get(cfg.trainer, ())
    if differentiated and cfg.gradient_checkpointing:
        wrapper.model.enable_gradient_checkpointing(True, offload=cfg.gradient_checkpointing_offload)


def dit_weights(cfg: TrainConfig, role: str) -> dict[str, torch.Tensor]:
    """Full state dict (official key names, CPU) for `role`, to load into `make_dit(...).model`.

    The generator reads `generator_ckpt` (a Self-Forcing `.pt` -> its `generator` entry, upstream's
    `ode_init.pt`, or a Wan model folder); without it, it starts from the critic's/teacher's weights
    (as upstream initialises every role from a Wan base model).
    """
    path = getattr(cfg, f"{role}_ckpt")
    if role == "generator" and path is None:
        path = cfg.fake_score_ckpt or cfg.real_score_ckpt
        source = "fake_score" if cfg.fake_score_ckpt else "real_score"
        if path is not None and wan_config(cfg, source) != wan_config(cfg, "generator"):
            path = None
    if path is not None:
        key = {"generator": "generator", "fake_score": "critic", "real_score": "generator"}[role]
        logger.info("loading %s weights from %s", role, path)
        return read_dit_weights(Path(path), key=key)
    preset = getattr(cfg, f"{role}_model")
    if is_component(preset):  # trained from scratch: the network's own (seeded) initialisation
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            torch.manual_seed(cfg.seed)
            return WanModel(wan_config(cfg, role)).state_dict()
    if preset != "tiny":
        raise ConfigError(
            f"{role}_ckpt is required for the {preset!r} preset (random weights only for 'tiny' and "
            "for components)"
        )
    return toy_dit_state_dict(wan_config(cfg, role))


def lora_spec(cfg: TrainConfig, role: str) -> LoraSpec | None:
    """The adapters `role` trains (`lora_base_model` names it), else None (the role trains every weight)."""
    if role not in lora_roles(cfg):
        return None
    alpha = float(cfg.lora_rank if cfg.lora_alpha is None else cfg.lora_alpha)
    return LoraSpec(rank=cfg.lora_rank, alpha=alpha, target_modules=lora_targets(cfg))


def add_lora_to_loaded(dit: nn.Module, cfg: TrainConfig, spec: LoraSpec, seed: int) -> None:
    """On the copy that holds the base weights (official names): merge `preset_lora_path` into them,
    inject fresh adapters (A from `seed`, B = 0), then load `lora_checkpoint` if given."""
    if cfg.preset_lora_path is not None:
        logger.info("merging preset LoRA %s into the base weights", cfg.preset_lora_path)
        dit.load_state_dict(merge_lora(dit.state_dict(), read_lora(cfg.preset_lora_path)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        add_lora(dit, spec)
    if cfg.lora_checkpoint is not None:
        logger.info("starting from the adapters in %s", cfg.lora_checkpoint)
        load_adapters(dit, read_lora(cfg.lora_checkpoint), spec)


def build_text_encoder(
    cfg: TrainConfig, device: torch.device, dtype: torch.dtype = torch.float32, structure_only: bool = False
) -> WanTextEncoder:
    """umT5 from `text_encoder_path` (diffusers folder, or original `.pth` beside `google/umt5-xxl/`).

    `structure_only` builds the network (on the current default device, e.g. meta) and the tokenizer
    without reading the weights: the trainer's non-zero ranks do that and receive rank 0's weights.
    """
    if cfg.text_encoder is not None:
        return component_text_encoder(cfg, device)
    gcfg = wan_config(cfg, "generator")
    path = cfg.text_encoder_path
    if path is None:
        if cfg.generator_model != "tiny":
            raise ConfigError("text_encoder_path is required unless generator_model is 'tiny'")
        encoder = toy_text_encoder(text_dim=gcfg.text_dim, text_len=gcfg.text_len)
        return encoder if structure_only else encoder.to(device)
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    from wan.text_encoder import WanTextEncoder, umt5_xxl_config

    p = Path(path)
    if p.is_dir() and (p / "text_encoder").is_dir():
        if structure_only:
            config = UMT5Config.from_pretrained(p / "text_encoder", local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(p / "tokenizer", local_files_only=True)
            return WanTextEncoder(UMT5EncoderModel(config).to(dtype), tokenizer, text_len=gcfg.text_len)
        return WanTextEncoder.from_diffusers_folder(p, dtype=dtype, device=device, text_len=gcfg.text_len)
    if p.is_file():
        tokenizer_path = p.parent / "google" / "umt5-xxl"
        if structure_only:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
            return WanTextEncoder(
                UMT5EncoderModel(umt5_xxl_config()).to(dtype), tokenizer, text_len=gcfg.text_len
            )
        return WanTextEncoder.from_original(
            p, tokenizer_path, dtype=dtype, device=device, text_len=gcfg.text_len
        )
    raise FileNotFoundError(f"text_encoder_path={path}: neither a diffusers folder nor a .pth file")


def component_text_encoder(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The `text_encoder` component on `device`, checked on the negative prompt: it must map a list
    of prompts to `{"prompt_embeds": [B, L, text_dim]}` with the generator's text_dim."""
    encoder = instantiate("text_encoder", cfg.text_encoder)
    name = cfg.text_encoder["_component_"]
    if not isinstance(encoder, nn.Module):
        raise ConfigError(f"text_encoder: {name} returned a {type(encoder).__name__}, not an nn.Module")
    encoder = encoder.to(device)
    try:
        out = encoder([cfg.negative_prompt])
    except (TypeError, ValueError) as err:
        raise ConfigError(f"text_encoder: {name}([negative_prompt]) failed: {err}") from err
    embeds = out.get("prompt_embeds") if isinstance(out, Mapping) else None
    text_dim = wan_config(cfg, "generator").text_dim
    if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3 or embeds.shape[-1] != text_dim:
        got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"text_encoder: {name} lacks the role's interface list[str] -> {{'prompt_embeds': "
            f"[B, L, {text_dim}]}} (the generator's text_dim); it gave {got}"
        )
    return encoder


def build_vae(cfg: TrainConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> WanVAE:
    """Wan VAE from `vae_path` (diffusers folder with `vae/`, or the original `Wan2.1_VAE.pth`)."""
    if cfg.vae is not None:
        vae = instantiate("vae", cfg.vae)
        for method in ("encode", "decode"):
            if not callable(getattr(vae, method, None)):
                raise ConfigError(
                    f"vae: {cfg.vae['_component_']} builds a {type(vae).__name__} without {method}(); "
                    "a VAE/codec needs encode(videos [B, 3, T, H, W]) and decode(latents [B, F, C, h, w])"
                )
        return vae.to(device) if isinstance(vae, nn.Module) else vae
    path = cfg.vae_path
    if path is None:
        if cfg.generator_model != "tiny":
            raise ConfigError("vae_path is required unless generator_model is 'tiny'")
        return toy_vae(z_dim=wan_config(cfg, "generator").in_dim).to(device)
    from wan.vae import WanVAE

    p = Path(path)
    if p.is_dir():
        return WanVAE.from_diffusers_folder(p, dtype=dtype, device=device)
    return WanVAE.from_original(p, dtype=dtype, device=device)


# Objectives that train on the Self-Forcing rollout (built once in `build_objective_from_config`).
ROLLOUT_OBJECTIVES = ("dmd", "sid", "gan")

# Frozen networks whose output an objective differentiates (SiD's generator loss backpropagates
# through the teacher to the generated latents): they need activation checkpointing as much as the
# trainable ones (upstream enables it on SiD's real score too).
BACKPROP_THROUGH_FROZEN: dict[str, tuple[str, ...]] = {"sid": ("real_score",)}

# Which networks each objective needs: (real score, critic).
NEEDS = {
    "dmd": (True, True),
    "sid": (True, True),
    "causvid": (True, True),
    "gan": (False, True),
    "ode": (False, False),
    "diffusion": (False, False),
    "teacher_regression": (True, False),
}


def build_objective_from_config(
    cfg: TrainConfig,
    generator: WanDiffusionWrapper,
    real_score: WanDiffusionWrapper | None,
    critic: WanDiffusionWrapper | None,
    vae: WanVAE | None,
    latent_dtype: torch.dtype,
):
    """Wire the config's keys into the objective named by `cfg.trainer`.

    For the rollout objectives (dmd, sid, gan) the Self-Forcing rollout is built here, once, and
    handed to the objective as `rollout`.
    """
    from model import SelfForcingGenerator, build_objective

    scheduler = FlowMatchScheduler(
        shift=cfg.model_kwargs.timestep_shift, num_train_timesteps=cfg.num_train_timestep
    )
    steps = step_list(cfg)
    name = cfg.trainer
    rollout = None
    if name in ROLLOUT_OBJECTIVES:
        rollout = SelfForcingGenerator.build(
            generator,
            scheduler,
            image_or_video_shape=list(cfg.image_or_video_shape),
            denoising_step_list=[s for s in steps if s > 0],
            num_frame_per_block=cfg.num_frame_per_block,
            num_training_frames=cfg.num_training_frames,
            independent_first_frame=cfg.independent_first_frame,
            same_step_across_blocks=cfg.same_step_across_blocks,
            last_step_only=cfg.last_step_only,
            context_noise=cfg.context_noise,
            vae=vae,
            latent_dtype=latent_dtype,
        )
    score = dict(
        timestep_shift=cfg.timestep_shift,
        ts_schedule=cfg.ts_schedule,
        ts_schedule_max=cfg.ts_schedule_max,
        min_score_timestep=cfg.min_score_timestep,
    )
    distill = dict(
        score,
        guidance_scale=cfg.guidance_scale,
        real_guidance_scale=cfg.real_guidance_scale,
        fake_guidance_scale=cfg.fake_guidance_scale,
        num_train_timestep=cfg.num_train_timestep,
        denoising_loss_type=cfg.denoising_loss_type,
    )
    if name == "dmd":
        return build_objective("dmd", generator, real_score, critic, scheduler, rollout=rollout, **distill)
    if name == "sid":
        return build_objective(
            "sid",
            generator,
            real_score,
            critic,
            scheduler,
            rollout=rollout,
            sid_alpha=cfg.sid_alpha,
            **distill,
        )
    if name == "causvid":
        return build_objective(
            "causvid",
            generator,
            real_score,
            critic,
            scheduler,
            denoising_step_list=steps,
            num_frame_per_block=cfg.num_frame_per_block,
            independent_first_frame=cfg.independent_first_frame,
            teacher_forcing=cfg.teacher_forcing,
            **distill,
        )
    if name == "gan":
        return build_objective(
            "gan",
            generator,
            critic,
            scheduler,
            rollout=rollout,
            **score,
            critic_timestep_shift=cfg.critic_timestep_shift,
            relativistic_discriminator=cfg.relativistic_discriminator,
            gan_g_weight=cfg.gan_g_weight,
            gan_d_weight=cfg.gan_d_weight,
            r1_weight=cfg.r1_weight,
            r2_weight=cfg.r2_weight,
            r1_sigma=cfg.r1_sigma,
            r2_sigma=cfg.r2_sigma,
        )
    if name == "ode":
        return build_objective(
            "ode",
            generator,
            denoising_step_list=steps,
            num_frame_per_block=cfg.num_frame_per_block,
            independent_first_frame=cfg.independent_first_frame,
            i2v=cfg.i2v,
            num_train_timestep=cfg.num_train_timestep,
        )
    if name == "diffusion":
        return build_objective(
            "diffusion",
            generator,
            scheduler,
            num_frame_per_block=cfg.num_frame_per_block,
            independent_first_frame=cfg.independent_first_frame,
            teacher_forcing=cfg.teacher_forcing,
            noise_augmentation_max_timestep=cfg.noise_augmentation_max_timestep,
        )
    if name == "teacher_regression":
        return build_objective(
            "teacher_regression",
            generator,
            real_score,
            scheduler,
            num_frame_per_block=cfg.num_frame_per_block,
            independent_first_frame=cfg.independent_first_frame,
            denoising_loss_type=cfg.denoising_loss_type,
        )
    raise ConfigError(f"unknown trainer {name!r}")
