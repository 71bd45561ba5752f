"""Helpers for multi-process tests: a torchrun launcher, a per-check result recorder, a toy network.

A test module launches one worker script under torchrun (CPU, gloo); the script runs several named
checks and each rank records, per check, either "ok" or the failure's traceback in a JSON file.
Each pytest test then asserts on one check, so a failure names the check and shows the traceback
of every failing rank.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from utils.distributed import DistInfo, cleanup, init_distributed

REPO_ROOT = Path(__file__).resolve().parents[1]
DIST_SCRIPTS = Path(__file__).resolve().parent / "_dist_scripts"
OK = "ok"


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0 and release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env() -> dict[str, str]:
    """Environment for running the repo's scripts in a subprocess: repo on the path, CPU only
    (accelerators hidden, so gloo is used), one thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_torchrun(
    script: Path, args: Sequence[str] = (), nproc: int = 2, timeout: float = 180.0
) -> subprocess.CompletedProcess[str]:
    """Run `python3 -m torch.distributed.run --nproc_per_node N --master_port <free> script args`.

    CPU only (accelerators hidden, so gloo is used); fails the calling test with the full output
    when the return code is not 0 or the timeout passes.
    """
    env = subprocess_env()
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(script), *map(str, args),
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        pytest.fail(f"torchrun {script.name} timed out after {timeout}s\n{out}")
    if proc.returncode != 0:
        pytest.fail(
            f"torchrun {script.name} exited with {proc.returncode}\n--- stdout ---\n{proc.stdout}\n"
            f"--- stderr ---\n{proc.stderr}"
        )
    return proc


@contextmanager
def single_process_group() -> Iterator[DistInfo]:
    """In-process world of one (gloo, CPU), as a run without torchrun gets; destroyed afterwards."""
    saved = {
        v: os.environ.pop(v)
        for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
        if v in os.environ
    }
    mp = pytest.MonkeyPatch()
    mp.setattr(torch.cuda, "is_available", lambda: False)
    if getattr(torch, "accelerator", None) is not None:
        mp.setattr(torch.accelerator, "is_available", lambda: False)
    try:
        yield init_distributed(timeout_s=60)
    finally:
        cleanup()
        mp.undo()
        os.environ.update(saved)


class CheckRecorder:
    """Inside a worker: run named checks, record "ok" or the traceback, write `<out>/rank<r>.json`."""

    def __init__(self, out_dir: str | Path, rank: int) -> None:
        self.path = Path(out_dir) / f"rank{rank}.json"
        self.results: dict[str, str] = {}

    def run(self, name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
            self.results[name] = OK
        except Exception:  # recorded for the pytest side; the next check still runs
            self.results[name] = traceback.format_exc()

    def write(self) -> None:
        self.path.write_text(json.dumps(self.results, indent=1), encoding="utf-8")


def load_check_results(out_dir: Path, nproc: int) -> dict[int, dict[str, str]]:
    """Read every rank's recorded results."""
    results = {}
    for rank in range(nproc):
        path = out_dir / f"rank{rank}.json"
        assert path.is_file(), f"rank {rank} wrote no results to {path}"
        results[rank] = json.loads(path.read_text(encoding="utf-8"))
    return results


def assert_check(results: dict[int, dict[str, str]], name: str) -> None:
    """Fail unless every rank recorded `name` as passed; show the failing ranks' tracebacks."""
    failures = {r: res.get(name, "check did not run") for r, res in results.items() if res.get(name) != OK}
    if failures:
        pytest.fail(
            f"check {name!r} failed on ranks {sorted(failures)}:\n"
            + "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
        )


# ------------------------------------------------------------------------------------------------
# Toy network with the same shape of module tree as the DiT: blocks in an nn.ModuleList.
# ------------------------------------------------------------------------------------------------


class ToyBlock(nn.Module):
    """Residual MLP block; counts forward calls and records the compute dtype it saw."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.calls = 0
        self.last_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.fc1(self.norm(x).to(self.fc1.weight.dtype))
        self.last_dtype = h.dtype
        return x + self.fc2(torch.nn.functional.gelu(h))


class ToyNet(nn.Module):
    """`x: [B, d_in] -> [B, d_out]`. Sizes are odd so that FSDP's dim-0 shards are uneven."""

    def __init__(self, d_in: int = 5, dim: int = 7, hidden: int = 11, d_out: int = 3, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(d_in, dim)
        self.blocks = nn.ModuleList(ToyBlock(dim, hidden) for _ in range(depth))
        self.head = nn.Linear(dim, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Like the Wan DiT: cast the input to the (possibly bf16) parameter dtype itself.
        h = self.embed(x.to(self.embed.weight.dtype))
        for block in self.blocks:
            h = block(h)
        return self.head(h)
