"""Test helper: LMDBs in upstream's layout, written with raw lmdb calls (independent of our writer)."""

from __future__ import annotations

from pathlib import Path

import lmdb
import numpy as np


def write_upstream_env(
    path: Path, rows: np.ndarray, prompts: list[str], full_prompt_shape: bool = False
) -> None:
    """Write an LMDB the way upstream's scripts do, with raw lmdb calls (independent of our writer)."""
    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, (row, prompt) in enumerate(zip(rows, prompts)):
            txn.put(f"latents_{i}_data".encode(), row.astype(np.float16).tobytes())
            txn.put(f"prompts_{i}_data".encode(), prompt.encode())
        shape = " ".join(str(d) for d in rows.shape)
        txn.put(b"latents_shape", shape.encode())
        txn.put(b"prompts_shape", (shape if full_prompt_shape else str(len(prompts))).encode())
    env.close()


def write_toy_ode_lmdb(path: Path) -> Path:
    """8 seeded rows `[K+1=5, F=6, C=4, 8, 8]` in our LMDB layout (the tiny configs' shapes): ODE
    trajectories for `trainer: ode`, and clean latents via `row[-1]` for the latent objectives."""
    import torch

    from utils.lmdb import LMDBWriter

    g = torch.Generator().manual_seed(0)
    with LMDBWriter(path) as writer:
        for i in range(8):
            writer.write(f"toy prompt {i}", torch.randn(5, 6, 4, 8, 8, generator=g))
    return path
