"""The loop's counters that survive a restart, and the seeds of a run's random draws."""

from __future__ import annotations

import hashlib
from typing import Any

from torch.distributed.checkpoint.stateful import Stateful

from utils.errors import UserError


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
