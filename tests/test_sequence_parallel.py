"""Ulysses sequence parallelism (sp_size): the DiT with its tokens split over 2 ranks against the
one-process DiT, and the trainer / inference at sp_size=2 against sp_size=1.

The network checks run in one torchrun launch (tests/_dist_scripts/sequence_parallel_checks.py, see
its docstring for what "equal" means for gradients); the end-to-end runs are marked slow.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import imageio.v3 as iio
import pytest
import torch

from tests.dist_helpers import (
    DIST_SCRIPTS,
    REPO_ROOT,
    assert_check,
    load_check_results,
    run_torchrun,
    single_process_group,
    subprocess_env,
)
from tests.test_inference_cli import PROMPTS, _check_outputs, _run
from tests.test_train import _cmd, kill_after_checkpoint, load_checkpoint, train, weights
from utils.config import ConfigError, load_config
from utils.errors import UserError
from utils.run_record import CHANGEABLE_KEYS
from utils.sequence_parallel import init_sequence_parallel
from wan import CausalWanModel, WanConfig, WanModel

NPROC = 2


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sequence_parallel_checks")
    run_torchrun(DIST_SCRIPTS / "sequence_parallel_checks.py", [out], nproc=NPROC, timeout=600)
    return load_check_results(out, NPROC)


@pytest.mark.parametrize(
    "check",
    [
        "layout",
        "bidirectional",
        "causal_train",
        "causal_train_window_sink",
        "teacher_forcing",
        "cached_rollout",
        "rollout_grad",
        "gan_head",
        "dmd_step_fsdp",
        "activations_per_rank",
    ],
)
def test_two_rank_sequence_parallel_check(results, check):
    assert_check(results, check)


def test_check_cuda_sequence_parallel_section_runs_on_gloo():
    # scripts/check_cuda.py's multi-GPU check, on the CPU: gloo, fp32, uneven token shards.
    proc = run_torchrun(REPO_ROOT / "scripts" / "check_cuda.py", ["--sp_worker"], nproc=NPROC, timeout=600)
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("sequence parallel over gloo (sp=2, torch.float32)"), proc.stdout
    assert "causal training path out" in line and "bidirectional out" in line


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_count_on_fake_tensors_equals_a_real_forward(checkpointing):
    from scripts.activation_memory import count

    cfg = WanConfig.preset("tiny")
    for dtype in (torch.float32, torch.bfloat16):
        real = count(cfg, 2, 3, (6, 6), dtype, checkpointing, fake=False)
        assert count(cfg, 2, 3, (6, 6), dtype, checkpointing, fake=True) == real > 0


# ------------------------------------------------------------------------------------------------ errors
class _Group:
    """Stands in for a communicator where only its size matters (the head check)."""

    def __init__(self, size: int) -> None:
        self.size, self.rank = size, 0


def test_heads_that_do_not_split_over_sp_are_refused():
    three_heads = WanConfig.preset("tiny").replace(dim=36, num_heads=3)
    for model in (WanModel(three_heads), CausalWanModel(three_heads, num_frame_per_block=3)):
        with pytest.raises(ValueError, match=r"num_heads \(3\) divisible by sp_size \(2\).*\[1, 3\]"):
            model.enable_sequence_parallel(_Group(2))
        assert model.sequence_parallel is None
    model = WanModel(WanConfig.preset("tiny"))
    model.enable_sequence_parallel(_Group(1))  # a group of one is no sequence parallelism at all
    assert model.sequence_parallel is None


def test_sp_size_must_divide_the_processes():
    with single_process_group() as info:
        with pytest.raises(UserError, match=r"sp_size=2 .*world_size=1"):
            init_sequence_parallel(2, info)
        dims = init_sequence_parallel(1, info)
        assert (dims.dp_rank, dims.dp_size, dims.sp_rank, dims.comm) == (0, 1, 0, None)


def test_sp_size_key():
    assert load_config(None, []).sp_size == 1
    with pytest.raises(ConfigError, match="sp_size must be >= 1"):
        load_config(None, ["sp_size=0"])
    assert "sp_size" in CHANGEABLE_KEYS  # a run resumes at another sp_size


def test_train_refuses_an_sp_size_that_does_not_divide_the_processes(tmp_path):
    proc = subprocess.run(
        _cmd("configs/tiny_dmd.yaml", tmp_path / "run", ["max_steps=1", "sp_size=3"]),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: sp_size=3 must be >= 1 and divide the number of processes (world_size=1)" in proc.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()


# ------------------------------------------------------------------------------------------------ end to end
# 6x6 latents: 9 tokens per frame, which do not split over 2 ranks.
ODD = ["image_or_video_shape=[1,6,4,6,6]", "sample_every=0", "dfake_gen_update_ratio=1", "ema_start_step=1"]
TIMEOUT = 900  # seconds per launch: torchrun start-up alone takes minutes on a loaded 2-core machine


def assert_same_run(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Weights of two runs that differ by float32 round-off only. AdamW's first steps move each weight
    by about lr * sign(gradient), so a gradient entry that round-off flips around zero moves by up to
    2 lr = 4e-4 (tiny_dmd's lr); the gradients themselves are compared to 1e-5 in the torchrun checks."""
    assert a.keys() == b.keys() and any(k.startswith("critic.") for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-4), (k, float((a[k] - b[k]).abs().max()))


def logged(run) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.endswith(("_loss", "_grad_norm"))} for r in rows]


@pytest.mark.slow
def test_dmd_training_at_sp2_equals_sp1(tmp_path):
    common = [*ODD, "max_steps=2", "log_iters=2"]
    train("configs/tiny_dmd.yaml", tmp_path / "sp2", [*common, "sp_size=2"], nproc=2, timeout=TIMEOUT)
    train("configs/tiny_dmd.yaml", tmp_path / "sp1", common, nproc=1, timeout=TIMEOUT)
    two, one = logged(tmp_path / "sp2"), logged(tmp_path / "sp1")
    assert len(two) == len(one) == 2 and all(len(r) == 4 for r in one)  # both losses and grad norms
    for r2, r1 in zip(two, one, strict=True):
        assert r2.keys() == r1.keys()
        for k in r1:
            assert r2[k] == pytest.approx(r1[k], rel=1e-4), k
    assert_same_run(
        weights(load_checkpoint(tmp_path / "sp2", 2)), weights(load_checkpoint(tmp_path / "sp1", 2))
    )


@pytest.mark.slow
def test_kill_at_sp2_resumes_exactly_at_sp1(tmp_path):
    common = [*ODD, "max_steps=4", "log_iters=2"]
    # Uninterrupted at sp=2; its step-2 checkpoint also seeds a clean resume at sp=1.
    train("configs/tiny_dmd.yaml", tmp_path / "straight", [*common, "sp_size=2"], nproc=2, timeout=TIMEOUT)
    clean = tmp_path / "clean"
    shutil.copytree(tmp_path / "straight", clean)
    shutil.rmtree(clean / "checkpoints" / "step_00000004")
    # kill -9 at sp=2 as soon as step 2 is on disk, then resume both at sp=1 (one process).
    killed = tmp_path / "killed"
    marker = kill_after_checkpoint(
        "configs/tiny_dmd.yaml", killed, [*common, "sp_size=2"], step=2, nproc=2, wait_s=TIMEOUT
    )
    assert marker.exists() and not (killed / "checkpoints" / "step_00000004").exists(), "kill came too late"
    for run in (killed, clean):
        assert "resumed from step 2" in train("configs/tiny_dmd.yaml", run, common, nproc=1, timeout=TIMEOUT)
    a, b = weights(load_checkpoint(killed, 4)), weights(load_checkpoint(clean, 4))
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert_same_run(a, weights(load_checkpoint(tmp_path / "straight", 4)))  # sp=2 throughout


@pytest.mark.slow
def test_inference_with_sp2_matches_one_process(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = [
        "inference.py",
        "--config",
        "configs/tiny_dmd.yaml",
        "--data_path",
        str(prompts),
        "--num_output_frames",
        "3",
    ]
    one = _run([*args, "--output_folder", str(tmp_path / "one")], timeout=TIMEOUT)
    two = _run([*args, "--output_folder", str(tmp_path / "sp"), "sp_size=2"], nproc=2, timeout=TIMEOUT)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-4000:]
    _check_outputs(tmp_path / "one", 9)
    summary = _check_outputs(tmp_path / "sp", 9)  # every prompt once: one group of 2 ranks
    assert summary["sp_size"] == 2 and summary["world_size"] == 2
    # The latents differ by float32 round-off; a pixel that rounds the other way changes H.264's choices
    # a little, so the decoded mp4s are close, not equal (a different video differs by tens on average).
    for mp4 in (tmp_path / "one").glob("*.mp4"):
        diff = abs(iio.imread(mp4).astype(int) - iio.imread(tmp_path / "sp" / mp4.name).astype(int))
        assert diff.mean() <= 0.05 and diff.max() <= 16, (mp4.name, diff.mean(), diff.max())


@pytest.mark.slow
def test_benchmark_reports_every_ranks_peak_memory(tmp_path):
    from scripts import benchmark

    out = tmp_path / "bench.json"
    argv = ["--geometry", "tiny", "--repeats", "1", "--threads", "1", "--rows", "train_fwd_bwd", "--sp", "2"]
    benchmark.main([*argv, "--json", str(out)])  # starts `torchrun --nproc_per_node 2` for the row
    data = json.loads(out.read_text())
    assert data["meta"]["sp"] == 2
    (row,) = data["rows"]
    peaks = row["peak_mem_mb_per_rank"]
    assert len(peaks) == 2 and row["peak_mem_mb"] == max(peaks) >= row["base_mem_mb"] > 0
    assert "per-rank peak MiB" in row["note"] and row["median_s"] > 0
