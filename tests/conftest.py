"""Shared test set-up: deterministic, single-threaded-friendly CPU runs."""

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield
