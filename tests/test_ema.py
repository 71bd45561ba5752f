"""EMA: the update formula, weight swapping, state dicts, and local-shard updates under FSDP2."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.dist_helpers import DIST_SCRIPTS, ToyNet, assert_check, load_check_results, run_torchrun
from utils.ema import EMA


def perturb(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))


def test_update_follows_formula():
    model = ToyNet()
    ema = EMA(model)
    expected = {k: v.detach().clone() for k, v in model.named_parameters()}
    for step, d in enumerate((0.9, 0.99, 0.0, 1.0)):
        perturb(model, seed=step)
        ema.update(model, d)
        params = dict(model.named_parameters())
        expected = {k: d * expected[k] + (1 - d) * params[k].detach() for k in expected}
        for k, v in ema.state_dict().items():
            torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-7, msg=k)


def test_shadow_is_fp32_copy_for_bf16_module():
    model = ToyNet().to(torch.bfloat16)
    ema = EMA(model)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    perturb(model, seed=1)
    ema.update(model, 0.75)
    for k, p in model.named_parameters():
        shadow = ema.state_dict()[k]
        assert shadow.dtype == torch.float32
        torch.testing.assert_close(shadow, 0.75 * before[k] + 0.25 * p.detach().float(), rtol=1e-6, atol=1e-7)


def test_copy_from_reinitialises():
    model = ToyNet()
    ema = EMA(model)
    perturb(model, seed=3)
    ema.copy_from(model)  # upstream's re-creation at ema_start_step
    for k, p in model.named_parameters():
        assert torch.equal(ema.state_dict()[k], p.detach())


def test_swap_into_uses_average_then_restores():
    model = ToyNet()
    ema = EMA(model)
    perturb(model, seed=4)
    ema.update(model, 0.5)
    trained = copy.deepcopy(model.state_dict())
    reference = ToyNet()
    reference.load_state_dict(ema.state_dict())
    x = torch.randn(3, 5)
    with torch.no_grad(), ema.swap_into(model):
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k

    with pytest.raises(RuntimeError, match="boom"), ema.swap_into(model):
        raise RuntimeError("boom")
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k

    ema.copy_to(model)
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), ema.state_dict()[k])


def test_state_dict_round_trip_and_errors():
    model = ToyNet()
    ema = EMA(model)
    perturb(model, seed=5)
    ema.update(model, 0.3)
    saved = {k: v.clone() for k, v in ema.state_dict().items()}
    other = EMA(ToyNet())
    other.load_state_dict(saved)
    for k, v in other.state_dict().items():
        assert torch.equal(v, saved[k])
    full = other.full_state_dict()
    assert all(full[k].data_ptr() != v.data_ptr() for k, v in other.state_dict().items())  # copies

    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({k: v for k, v in saved.items() if k != "head.bias"})
    with pytest.raises(KeyError, match="disagree"):
        ema.update(ToyNet(depth=2), 0.9)
    with pytest.raises(ValueError, match="decay"):
        ema.update(model, 1.5)


def test_sharded_ema_matches_slice_of_reference(tmp_path):
    run_torchrun(DIST_SCRIPTS / "ema_checks.py", [tmp_path], nproc=2)
    results = load_check_results(tmp_path, 2)
    assert_check(results, "sharded_ema")
    assert_check(results, "swap_after_gathered_forward")
