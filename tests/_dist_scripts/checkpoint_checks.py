"""torchrun worker for tests/test_checkpoint.py: `checkpoint_checks.py RUN_DIR REF_PT OUT_DIR` (2 ranks).

RUN_DIR holds a checkpoint written by ONE process (FSDP2 at world size 1) of a ToyNet + AdamW + EMA;
REF_PT holds the writer's full tensors. Here it is loaded into a 2-rank FSDP2 model built from a
different seed, then re-saved and re-loaded at world size 2.
"""

from __future__ import annotations

import random
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

from tests.dist_helpers import CheckRecorder, ToyNet
from utils.checkpoint import Checkpointer, ModelState
from utils.distributed import build_mesh, cleanup, init_distributed, shard_model
from utils.ema import EMA


class Sampler:
    """Stands in for a data sampler's position (small python state)."""

    def __init__(self) -> None:
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def build(info, seed: int):
    torch.manual_seed(seed)
    model = ToyNet()
    mesh = build_mesh("full", info.world_size, info.world_size, device_type=info.device.type)
    shard_model(model, mesh, mixed_precision=False)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optim, EMA(model), Sampler()


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def check_reshard_load(info, run_dir: str, ref_path: str) -> None:
    ref = torch.load(ref_path)
    model, optim, ema, sampler = build(info, seed=99)  # different weights than the writer's
    state = {"gen": ModelState(model, optim), "ema": ema, "sampler": sampler}
    step = Checkpointer(run_dir, keep_last=2).load_latest(state)
    assert step == ref["step"], step
    for name, value in model.state_dict().items():
        assert torch.equal(value.full_tensor(), ref["model"][name]), name
    optim_state = get_optimizer_state_dict(model, optim)["state"]
    for name, moments in ref["optim"].items():
        for key, value in moments.items():
            got = optim_state[name][key]
            got = got.full_tensor() if hasattr(got, "full_tensor") else got
            assert torch.equal(got, value), (name, key)
    for name, value in ema.state_dict().items():
        assert value.placements == dict(model.named_parameters())[name].placements
        assert torch.equal(value.full_tensor(), ref["ema"][name]), name
    assert sampler.position == ref["position"]

    # World size changed (1 -> 2): RNG is reseeded deterministically, differently per rank.
    first = draws()
    Checkpointer(run_dir, keep_last=2).load_latest(state)
    assert draws() == first, "reseeding after a world-size change is not deterministic"
    assert len({repr(d) for d in gather(first)}) == info.world_size, "ranks share a random stream"


def check_same_world_rng(info, run_dir: str) -> None:
    model, optim, ema, sampler = build(info, seed=5)
    state = {"gen": ModelState(model, optim), "ema": ema, "sampler": sampler}
    torch.manual_seed(1000 + info.rank)
    random.seed(2000 + info.rank)
    np.random.seed(3000 + info.rank)
    ckpt = Checkpointer(run_dir + "_w2", keep_last=1)
    ckpt.save(7, state)
    expected = draws()  # what each rank draws right after the save
    draws()
    assert ckpt.load_latest(state) == 7
    assert draws() == expected, "per-rank RNG not restored"
    assert len({repr(d) for d in gather(expected)}) == info.world_size


def main() -> None:
    run_dir, ref_path, out_dir = sys.argv[1:4]
    info = init_distributed(timeout_s=120)
    rec = CheckRecorder(out_dir, info.rank)
    rec.run("reshard_load", lambda: check_reshard_load(info, run_dir, ref_path))
    rec.run("same_world_rng", lambda: check_same_world_rng(info, run_dir))
    rec.write()
    cleanup()


if __name__ == "__main__":
    main()
