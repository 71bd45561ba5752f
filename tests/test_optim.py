"""AdamW construction, the linear warm-up schedule and gradient clipping (plain and FSDP2)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.dist_helpers import DIST_SCRIPTS, ToyNet, assert_check, load_check_results, run_torchrun
from utils.optim import LinearWarmup, build_optimizer, build_scheduler, clip_grad_norm


def test_build_optimizer_skips_frozen_parameters():
    net = ToyNet()
    net.embed.requires_grad_(False)
    opt = build_optimizer(net.parameters(), lr=2e-6, betas=(0.0, 0.999), weight_decay=0.01)
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (2e-6, (0.0, 0.999), 0.01)
    ids = {id(p) for p in group["params"]}
    assert ids == {id(p) for n, p in net.named_parameters() if not n.startswith("embed.")}
    net.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        build_optimizer(net.parameters(), lr=1.0, betas=(0.9, 0.99), weight_decay=0.0)


def test_linear_warmup_schedule():
    lr, warmup = 0.4, 4
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_scheduler(opt, warmup)
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # Optimizer step k (0-based) runs at lr * min(1, (k + 1) / warmup).
    assert seen == pytest.approx([lr * min(1.0, (k + 1) / warmup) for k in range(7)])
    assert [LinearWarmup(0)(k) for k in range(3)] == [1.0, 1.0, 1.0]

    # The scheduler's state survives a round trip (it is checkpointed).
    restored = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr), warmup)
    restored.load_state_dict(sched.state_dict())
    assert restored.last_epoch == sched.last_epoch == 7
    with pytest.raises(ValueError, match="warmup_steps"):
        LinearWarmup(-1)


def test_clip_grad_norm_plain_module():
    net = ToyNet()
    net(torch.randn(8, 5) * 10).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    expected = math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))

    assert clip_grad_norm(net, math.inf) == pytest.approx(expected, rel=1e-6)  # measure only
    for n, p in net.named_parameters():
        assert torch.equal(p.grad, grads[n])

    norm = clip_grad_norm(net, expected / 2)
    assert norm == pytest.approx(expected, rel=1e-6)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, grads[n] * (expected / 2) / expected, rtol=1e-5, atol=1e-8)


def test_clip_grad_norm_non_finite_leaves_gradients():
    net = ToyNet()
    net(torch.randn(2, 5)).sum().backward()
    net.head.bias.grad[0] = float("nan")
    before = {n: p.grad.clone() for n, p in net.named_parameters()}
    assert math.isnan(clip_grad_norm(net, 1.0))
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, before[n], rtol=0, atol=0, equal_nan=True)
    assert clip_grad_norm(torch.nn.Linear(2, 2), 1.0) == 0.0  # no gradients yet


def test_clip_grad_norm_under_fsdp2(tmp_path):
    run_torchrun(DIST_SCRIPTS / "optim_checks.py", [tmp_path], nproc=2)
    results = load_check_results(tmp_path, 2)
    assert_check(results, "clip_full")
    assert_check(results, "clip_hybrid")
