"""The stop policy: pre-emption signals that every rank agrees on, and the divergence stop."""

from __future__ import annotations

import logging
import signal

import torch

from utils.checkpoint import Checkpointer
from utils.distributed import broadcast_object

from .state import TrainingDivergedError

logger = logging.getLogger("train")


class StopSignals:
    """Pre-emption (SIGTERM/SIGUSR1) and a first Ctrl-C (SIGINT) ask the run to finish the step, save
    and stop; a second Ctrl-C interrupts at once. `agreed(step)` is the collective every rank calls
    at the end of a step, so all ranks stop at the same one."""

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        self.received: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self.received = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def agreed(self, step: int) -> bool:
        """All ranks stop at the same step if any rank got a signal (cluster pre-emption)."""
        signals = torch.zeros(self.world_size, dtype=torch.int64, device=self.device)
        signals[self.rank] = self.received or 0
        torch.distributed.all_reduce(signals)  # each rank's own signal number in its slot
        received = {rank: int(s) for rank, s in enumerate(signals.tolist()) if s}
        if received:
            who = ", ".join(f"rank {r}: {signal.Signals(s).name}" for r, s in received.items())
            logger.info("stopping at step %d on signal (%s)", step, who)
        return bool(received)


def check_divergence(
    step: int, streak: int, max_nan_skips: int, checkpointer: Checkpointer, rank: int
) -> None:
    """Stop after `max_nan_skips` consecutive skipped steps: the run is not coming back."""
    if streak < max_nan_skips:
        return
    latest = checkpointer.latest() if rank == 0 else None
    latest = broadcast_object(latest)
    kept = f"the latest checkpoint ({latest[1]}) is the last good one" if latest else "no checkpoint"
    raise TrainingDivergedError(
        f"stopping at step {step}: the last {streak} steps were all skipped because a "
        f"loss or gradient was not finite (max_nan_skips={max_nan_skips}); {kept}. "
        "Lower the learning rates (lr, lr_critic) or check the data and weights"
    )
