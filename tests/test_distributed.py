"""Process-group set-up, meshes, FSDP2 sharding, meta-device loading and shared randomness.

The 2-rank checks run in one torchrun launch (tests/_dist_scripts/distributed_checks.py); every
check compares against an unsharded single-process reference computed from the gathered inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.dist_helpers import (
    DIST_SCRIPTS,
    ToyNet,
    assert_check,
    load_check_results,
    run_torchrun,
    single_process_group,
)
from utils.distributed import (
    build_mesh,
    cleanup,
    get_module_list,
    init_distributed,
    seed_torch_rng,
    shard_model,
)

NPROC = 2


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed_checks")
    run_torchrun(DIST_SCRIPTS / "distributed_checks.py", [out], nproc=NPROC)
    return load_check_results(out, NPROC)


@pytest.mark.parametrize(
    "check",
    [
        "init",
        "parity_full",
        "parity_hybrid_one_gpu_per_node",
        "parity_hybrid_one_node",
        "parity_no_shard",
        "mixed_precision",
        "activation_checkpointing",
        "broadcast",
        "meta_load",
        "gradient_sync",
        "sparse_metric_mean",
        "user_error_everywhere",
    ],
)
def test_two_rank_check(results, check):
    assert_check(results, check)


@pytest.fixture
def spg():
    with single_process_group() as info:
        yield info


def test_without_torchrun_a_single_process_group_is_made(spg):
    info = spg
    assert (info.rank, info.world_size, info.launched) == (0, 1, False)
    assert info.device == torch.device("cpu") and info.backend == "gloo"
    assert dist.is_initialized() and dist.get_world_size() == 1
    assert init_distributed() == info  # idempotent

    # FSDP2 at world size 1 computes what the plain module computes.
    torch.manual_seed(0)
    model, ref = ToyNet(), ToyNet()
    ref.load_state_dict(model.state_dict())
    shard_model(model, build_mesh("full", 1, 1, device_type="cpu"), mixed_precision=False)
    x = torch.randn(3, 5)
    model(x).square().mean().backward()
    ref(x).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, msg=name)


def test_cleanup_is_safe_without_group():
    assert not dist.is_initialized()
    cleanup()


def test_build_mesh_rejects_bad_strategy_and_node_size(spg):
    with pytest.raises(ValueError, match="unknown sharding_strategy 'fulll'"):
        build_mesh("fulll", 1, 1, device_type="cpu")
    with pytest.raises(ValueError, match="multiple of gpus_per_node"):
        build_mesh("hybrid", 1, 2, device_type="cpu")
    with pytest.raises(ValueError, match="world_size=4"):
        build_mesh("full", 4, 4, device_type="cpu")


def test_get_module_list_names_the_culprit():
    net = ToyNet()
    assert get_module_list(net, "blocks") is net.blocks
    with pytest.raises(ValueError, match=r"no submodule 'model.blocks'"):
        get_module_list(net, "model.blocks")
    with pytest.raises(ValueError, match=r"ToyNet.head is a Linear"):
        get_module_list(net, "head")
    wrapper = nn.Module()
    wrapper.model = net  # the WanDiffusionWrapper layout: the DiT lives under `model`
    assert get_module_list(wrapper, "model.blocks") is net.blocks


def test_seed_torch_rng_draws_what_torch_manual_seed_draws():
    torch.manual_seed(7)
    want = torch.randn(5)
    torch.manual_seed(999)
    seed_torch_rng(7, torch.device("cpu"))
    assert torch.equal(torch.randn(5), want)
