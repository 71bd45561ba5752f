"""torchrun worker for tests/test_ema.py: `ema_checks.py OUT_DIR` (2 ranks, gloo, CPU).

An FSDP2-sharded ToyNet (bf16 mixed precision, so the fp32 shadow matters) and an unsharded
reference go through the same sequence of weights; the EMA formula is applied by hand to the
reference and each rank's shadow shard must equal its slice of it.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from tests.dist_helpers import CheckRecorder, ToyNet
from utils.distributed import build_mesh, cleanup, init_distributed, shard_model
from utils.ema import EMA

DECAYS = (0.9, 0.5, 0.99)


def weights_at(step: int, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full weights the 'optimizer' produced at `step` (identical on every rank)."""
    gen = torch.Generator().manual_seed(500 + step)
    return {k: torch.randn(v.shape, generator=gen) for k, v in like.items()}


def check_sharded_ema(info) -> None:
    torch.manual_seed(0)
    model = ToyNet()
    ref = copy.deepcopy(model)
    mesh = build_mesh("full", info.world_size, info.world_size, device_type=info.device.type)
    shard_model(model, mesh, mixed_precision=True)
    params = dict(model.named_parameters())

    ema = EMA(model)
    expected = {k: v.detach().clone() for k, v in ref.named_parameters()}
    for step, d in enumerate(DECAYS):
        new = weights_at(step, expected)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(distribute_tensor(new[name], p.device_mesh, p.placements))
        ema.update(model, d)
        expected = {k: d * expected[k] + (1 - d) * new[k] for k in expected}

    for name, shadow in ema.state_dict().items():
        p = params[name]
        assert isinstance(shadow, DTensor) and shadow.placements == p.placements, name
        assert shadow.dtype == torch.float32 and shadow.to_local().shape == p.to_local().shape, name
        my_slice = distribute_tensor(expected[name], p.device_mesh, p.placements).to_local()
        torch.testing.assert_close(shadow.to_local(), my_slice, rtol=1e-6, atol=1e-7, msg=name)

    gathered = ema.full_state_dict()
    if info.rank == 0:
        assert gathered.keys() == expected.keys()
        for name, value in gathered.items():
            assert value.device.type == "cpu"
            torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-7, msg=name)
    else:
        assert gathered == {}

    # Sampling with EMA weights: the sharded model inside swap_into computes what the reference
    # network loaded with the hand-computed average computes; the trained weights come back after.
    trained = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    ref.load_state_dict(expected)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(info.rank))
    with torch.no_grad(), ema.swap_into(model):
        torch.testing.assert_close(model(x), ref.to(torch.bfloat16)(x), rtol=2e-2, atol=2e-2)
        for name, p in params.items():
            torch.testing.assert_close(p.full_tensor(), expected[name], rtol=1e-6, atol=1e-7)
    for name, value in model.state_dict().items():
        assert torch.equal(value.full_tensor(), trained[name]), name


def check_swap_after_gathered_forward(info) -> None:
    """With reshard_after_forward=False a no-grad forward leaves parameters gathered; the swap
    must still put the EMA weights into the next forward and restore the trained ones after."""
    torch.manual_seed(0)
    model = ToyNet()
    ref = copy.deepcopy(model)  # holds the initial weights = the EMA after EMA(model)
    mesh = build_mesh("full", info.world_size, info.world_size, device_type=info.device.type)
    shard_model(model, mesh, mixed_precision=False, reshard_after_forward=False)
    ema = EMA(model)
    new = weights_at(7, dict(ref.named_parameters()))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(distribute_tensor(new[name], p.device_mesh, p.placements))
    trained = copy.deepcopy(ref)
    trained.load_state_dict(new)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(info.rank))
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x))  # parameters now stay gathered
        with ema.swap_into(model):
            torch.testing.assert_close(model(x), ref(x))
        torch.testing.assert_close(model(x), trained(x))
        ema.update(model, 0.25)
    for name, shadow in ema.state_dict().items():
        want = 0.25 * dict(ref.named_parameters())[name].detach() + 0.75 * new[name]
        torch.testing.assert_close(shadow.full_tensor(), want, rtol=1e-6, atol=1e-7, msg=name)


def main() -> None:
    info = init_distributed(timeout_s=120)
    rec = CheckRecorder(sys.argv[1], info.rank)
    rec.run("sharded_ema", lambda: check_sharded_ema(info))
    rec.run("swap_after_gathered_forward", lambda: check_swap_after_gathered_forward(info))
    rec.write()
    cleanup()


if __name__ == "__main__":
    main()
