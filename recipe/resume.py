"""Starting a run: the run record decides new run vs resume (and the seed), the latest checkpoint
restores every stateful piece, and this config's learning rates and schedules replace the saved ones."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from utils.checkpoint import Checkpointer
from utils.config import TrainConfig
from utils.distributed import broadcast_object, raise_user_error_everywhere, resolve_seed
from utils.errors import UserError
from utils.optim import apply_base_lrs, apply_schedule
from utils.run_record import check_resume_config, saved_run_config

logger = logging.getLogger("train")


def reconcile_with_run_record(cfg: TrainConfig, run_dir: Path, rank: int, allow_change: bool) -> None:
    """Before anything is built: a run that resumes keeps its seed (`seed: 0` was resolved once,
    at the run's first start) and must not change the keys that define it (utils/run_record.py);
    a new run resolves `seed: 0` to a drawn seed. Sets `cfg.seed`."""
    saved, error = None, None
    if cfg.resume and rank == 0:
        try:
            saved = saved_run_config(run_dir)
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
                f"{run_dir} has checkpoints but no config.yaml with the seed its run drew "
                "(seed: 0); pass the run's seed as seed=<n>"
            )
        cfg.seed = int(saved["seed"])
    if saved:
        check_resume_config(saved, cfg, allow_change)


def restore_latest(
    checkpointer: Checkpointer,
    state: Mapping[str, Any],
    optimizers: Sequence[tuple[str, torch.optim.Optimizer]],
    lr_schedulers: Mapping[str, torch.optim.lr_scheduler.LambdaLR],
) -> int | None:
    """Load the latest complete checkpoint into `state` (None: there is none); then this run's
    learning rates and LR schedules replace the restored ones (the optimizers, by checkpoint name)."""
    # This run's configured rates: a scheduler keeps them as `initial_lr` (its `lr` is already
    # scaled by the schedule's factor at step 0, e.g. a warm-up's).
    base_lrs = {name: [g.get("initial_lr", g["lr"]) for g in opt.param_groups] for name, opt in optimizers}
    # The schedules stay as this config builds them (a changed decay horizon passed the run-record
    # check only with the override flag): the checkpoint holds only their positions (SchedulerState).
    step = checkpointer.load_latest(state)
    for name, opt in optimizers:
        apply_base_lrs(opt, lr_schedulers.get(name), base_lrs[name])
    for scheduler in lr_schedulers.values():
        apply_schedule(scheduler)
    if step is not None:
        logger.info("resumed from step %d", step)
    return step
