"""Shared test set-up: deterministic, single-threaded-friendly CPU runs."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
# Tiny models are faster single-threaded on our 2-core machines, and torchrun tests run several
# processes at once: one thread each (inherited by subprocesses) avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
