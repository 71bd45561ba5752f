"""The run's record, `<run_dir>/config.yaml`: written once a start has passed every check, and
compared with the new config when a run resumes.

A resumed run continues the run its checkpoint belongs to, so the keys that define that run
(objective, model presets and shapes, seed, data, step lists, ...) must not change under it: a
difference is an error naming every differing key, unless the user passes an explicit override.
Keys in `CHANGEABLE_KEYS` (how long to train, how often to save, learning rates, guidance, ...) may
change on resume; they take effect and each difference is logged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from utils.config import ConfigError, TrainConfig, config_to_dict, lr_decay_horizon

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
# The command-line flag of train.py that lets run-defining keys change on resume.
OVERRIDE_FLAG = "--allow_config_change"

# Keys that may differ between a run's saved config and the config it resumes with. Everything
# else defines the run. Learning rates and guidance are read afresh (the trainer re-applies the
# learning rates to the restored optimizers); the rest is read every step or only at start-up.
CHANGEABLE_KEYS = frozenset(
    {
        "logdir",
        "resume",
        "max_steps",  # with a decaying LR schedule, only where the decay horizon stays (decay_horizon)
        "lr_decay_steps",  # likewise
        "log_iters",
        "keep_last_checkpoints",
        "sample_every",
        "gc_interval",
        "max_nan_skips",
        "lr",
        "lr_critic",
        "guidance_scale",
        "real_guidance_scale",
        "fake_guidance_scale",
        "max_grad_norm_generator",
        "max_grad_norm_critic",
        "total_batch_size",  # a resume at another world size re-derives these two
        "gradient_accumulation_steps",
        "sharding_strategy",  # DCP reshards checkpoints
        "sp_size",  # sequence parallelism changes where tokens live, not what is computed
        "gradient_checkpointing",
        "gradient_checkpointing_offload",  # same gradients, less memory
        "sample_ema_weight",  # which EMA the sample videos use
        "text_encoder_cpu_offload",
        "compile",
        "wandb_mode",
        "wandb_project",
        "wandb_entity",
    }
)


def config_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CONFIG_FILE


def read_saved_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's saved config as a plain dict, or None when there is none."""
    path = config_path(run_dir)
    if not path.is_file():
        return None
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # yaml and omegaconf errors alike: the file is unreadable
        raise ConfigError(f"{path} (the run's saved config) cannot be read: {err}") from err
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} (the run's saved config) does not hold a mapping of keys")
    return loaded


def saved_run_config(run_dir: str | Path) -> dict[str, Any] | None:
    """What a start in `run_dir` resumes: None when there is no complete checkpoint (a new run),
    else the run's saved config ({} when the run has checkpoints but no config.yaml)."""
    from utils.checkpoint import Checkpointer

    if Checkpointer(run_dir).latest() is None:
        return None
    return read_saved_config(run_dir) or {}


def write_config(cfg: TrainConfig, run_dir: str | Path) -> Path:
    """Write `cfg` to `<run_dir>/config.yaml` atomically (rank 0, after a successful start)."""
    path = config_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: Mapping[str, Any], new: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """`{dotted key: (saved value, new value)}` for every key whose value differs. A key missing
    from the saved file (written by an older version) counts as different."""
    old, cur = _flatten(saved), _flatten(config_to_dict(new))
    missing = object()
    return {
        k: (old.get(k), cur.get(k))
        for k in sorted(set(old) | set(cur))
        if old.get(k, missing) != cur.get(k, missing)
    }


# What a decaying LR schedule's length is named by in a resume's error and log.
HORIZON = "LR decay horizon (lr_decay_steps, else max_steps - lr_decay_start or lr_warmup_steps)"


def decay_horizon(config: Mapping[str, Any]) -> int | None:
    """The optimizer steps a linear/cosine LR decay spans (`WarmupDecay.decay_steps`, as train.py
    derives it); None for a constant schedule or a step (no span), or a saved config that predates
    these keys."""
    keys = ("lr_schedule", "lr_decay_steps", "max_steps", "lr_warmup_steps")
    if any(k not in config for k in keys) or config["lr_schedule"] in ("constant", "step"):
        return None
    start = config.get("lr_decay_start")
    return lr_decay_horizon(config["lr_decay_steps"], config["max_steps"], config["lr_warmup_steps"], start)


def check_resume_config(saved: Mapping[str, Any], new: TrainConfig, allow_change: bool) -> dict[str, tuple]:
    """Compare the config a run resumes with against its saved one.

    Differing run-defining keys raise one `ConfigError` naming each of them (with both values),
    unless `allow_change`; then they are logged as warnings. Changeable differences are logged.
    Returns all differences.
    """
    diffs = config_differences(saved, new)
    defining = {k: v for k, v in diffs.items() if k.split(".")[0] not in CHANGEABLE_KEYS}
    horizons = (decay_horizon(saved), decay_horizon(config_to_dict(new)))
    hint = ""
    if horizons[0] is not None and horizons[0] != horizons[1]:
        # The steps already taken followed the saved horizon: no resume can equal a run that had the
        # new one from the start, so a changed horizon is a change of the run's definition.
        defining[HORIZON] = horizons
        hint = f" (lr_decay_steps={horizons[0]} keeps the saved decay horizon)"
    if defining and not allow_change:
        listed = "; ".join(f"{k}: {old!r} -> {cur!r}" for k, (old, cur) in defining.items())
        raise ConfigError(
            f"the run being resumed was started with a different config; keys that define the run "
            f"differ ({listed}). Use another logdir for a new run, or pass {OVERRIDE_FLAG} to "
            f"continue this run with the new values{hint}"
        )
    for key, (old, cur) in diffs.items():
        if key in defining:
            logger.warning("resuming with %s changed: %r -> %r (%s)", key, old, cur, OVERRIDE_FLAG)
        else:
            logger.info("resuming with %s changed: %r -> %r", key, old, cur)
    return diffs
