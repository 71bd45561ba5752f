"""scripts/generate_ode_pairs.py end to end on a tiny random teacher (CPU).

References: an Euler + CFG loop written out here over the bare `WanModel` (loaded from the same weights
file), with the documented per-prompt noise and hashed embeddings re-derived here; and, for resume and
multi-rank runs, an uninterrupted single-process run.
"""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from scripts import generate_ode_pairs
from tests.dist_helpers import REPO_ROOT, run_torchrun, subprocess_env
from tests.wan_helpers import randomize_
from utils.dataset import ODERegressionLMDBDataset
from utils.lmdb import LMDBReader, LMDBWriter, shard_path
from wan import WanConfig, WanModel

CFG = WanConfig.preset("tiny")
LATENT = (2, CFG.in_dim, 4, 4)  # [F, C, H, W]
STEPS, SHIFT, GUIDANCE, KEEP = 8, 8.0, 6.0, [0, 2, 4, 6, -1]
NEGATIVE = "blurry, static, low quality"
PROMPTS = [
    "a cat playing the piano",
    "a dog surfing a wave",
    "une voiture rouge la nuit",
    "a cat playing the piano",  # duplicate: generated once
    "",  # blank: dropped
    "水墨画风格的山水",
    "a red kite over the sea",
]
UNIQUE = list(dict.fromkeys(p for p in PROMPTS if p))  # (prompt, index among non-blank lines) below
INDEX = {p: [q for q in PROMPTS if q].index(p) for p in UNIQUE}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ode")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    model = randomize_(WanModel(CFG), seed=3).eval()
    weights = root / "teacher.pt"
    torch.save(model.state_dict(), weights)
    return {"root": root, "prompts": prompts, "weights": weights, "model": model}


def _argv(files, out, *extra, steps=STEPS):
    return [
        "--prompts", str(files["prompts"]), "--out", str(out), "--model", "tiny",
        "--weights", str(files["weights"]), "--hashed_text_embeddings", "--negative_prompt", NEGATIVE,
        "--num_steps", str(steps), "--shift", str(SHIFT), "--guidance_scale", str(GUIDANCE),
        "--keep_indices", *map(str, KEEP), "--latent_frames", str(LATENT[0]),
        "--latent_height", str(LATENT[2]), "--latent_width", str(LATENT[3]), *extra,
    ]  # fmt: skip


def _embeds(prompt: str) -> torch.Tensor:
    # the documented rule: randn(text_len, text_dim) from the first 8 bytes (little-endian) of SHA-256
    seed = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "little")
    return torch.randn(CFG.text_len, CFG.text_dim, generator=torch.Generator().manual_seed(seed))[None]


def _noise(seed: int, index: int) -> torch.Tensor:
    state = int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])
    return torch.randn(LATENT, generator=torch.Generator().manual_seed(state))[None]


def _reference_row(model, prompt: str, seed: int = 0) -> torch.Tensor:
    """Kept states [K+1, F, C, H, W] of a guided Euler loop written from the formulas."""
    sigmas = [SHIFT * u / (1 + (SHIFT - 1) * u) for u in (1 - i / STEPS for i in range(STEPS))] + [0.0]
    x = _noise(seed, INDEX[prompt])
    cond, uncond = _embeds(prompt), _embeds(NEGATIVE)
    states = [x]
    with torch.no_grad():
        for i in range(STEPS):
            t = torch.tensor([1000 * sigmas[i]])
            v_c = model(x.transpose(1, 2), t, cond).transpose(1, 2)
            v_u = model(x.transpose(1, 2), t, uncond).transpose(1, 2)
            x = x + (sigmas[i + 1] - sigmas[i]) * (v_u + GUIDANCE * (v_c - v_u))
            states.append(x)
    return torch.cat([states[i] for i in KEEP])


def _count(path) -> int:
    reader = LMDBReader(path)
    try:
        return len(reader)
    finally:
        reader.close()


def _rows(out) -> dict[str, torch.Tensor]:
    data = ODERegressionLMDBDataset(out)
    rows: dict[str, torch.Tensor] = {}
    for i in range(len(data)):
        item = data[i]
        assert item["prompts"] not in rows, f"prompt {item['prompts']!r} stored twice"
        rows[item["prompts"]] = item["ode_latent"]
    data.reader.close()
    return rows


@pytest.fixture(scope="module")
def uninterrupted(files):
    out = files["root"] / "uninterrupted"
    assert generate_ode_pairs.main(_argv(files, out)) == len(UNIQUE)
    return _rows(out)


def test_rows_equal_a_written_out_euler_loop(files, uninterrupted):
    assert sorted(uninterrupted) == sorted(UNIQUE)
    for prompt, row in uninterrupted.items():
        assert row.shape == (len(KEEP), *LATENT)
        expected = _reference_row(files["model"], prompt)
        # rows are stored in float16
        torch.testing.assert_close(row, expected.half().float(), rtol=2e-3, atol=2e-3)


def test_rerun_writes_nothing(files, uninterrupted):
    out = files["root"] / "rerun"
    generate_ode_pairs.main(_argv(files, out))
    assert generate_ode_pairs.main(_argv(files, out)) == 0
    assert len(_rows(out)) == len(UNIQUE)


@pytest.mark.slow
def test_killed_job_resumes_to_the_uninterrupted_rows(files, uninterrupted):
    out = files["root"] / "killed"
    script = REPO_ROOT / "scripts" / "generate_ode_pairs.py"
    # ~0.5 s per prompt so the kill lands mid-job; a separate run with these steps is the reference
    slow = ["--num_steps", "64", "--keep_indices", "0", "16", "32", "48", "-1"]
    cmd = [sys.executable, str(script), *_argv(files, out), *slow]
    proc = subprocess.Popen(cmd, env=subprocess_env(), cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120

    def committed() -> int:  # tqdm reports "n/total" after row n is committed
        return max(map(int, re.findall(rf"(\d+)/{len(UNIQUE)}", "".join(seen))), default=0)

    while committed() < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join(timeout=5)
    partial = _count(out)
    assert 2 <= partial < len(UNIQUE), f"kill landed after {partial} rows; output:\n{''.join(seen)}"

    assert generate_ode_pairs.main([*_argv(files, out), *slow]) == len(UNIQUE) - partial
    reference = files["root"] / "killed_reference"
    generate_ode_pairs.main([*_argv(files, reference), *slow])
    resumed, expected = _rows(out), _rows(reference)
    assert sorted(resumed) == sorted(expected) == sorted(UNIQUE)
    for prompt in UNIQUE:
        # noise depends on (seed, prompt index) only, so a resumed row is the uninterrupted row
        torch.testing.assert_close(resumed[prompt], expected[prompt], rtol=0, atol=0)


@pytest.mark.slow
def test_two_rank_torchrun_covers_every_prompt_once(files, uninterrupted):
    out = files["root"] / "torchrun"
    run_torchrun(REPO_ROOT / "scripts" / "generate_ode_pairs.py", _argv(files, out), nproc=2)
    per_shard = [_count(shard_path(out, r)) for r in range(2)]
    assert per_shard == [3, 2]  # 5 unique prompts dealt round-robin
    rows = _rows(out)
    assert sorted(rows) == sorted(UNIQUE)
    for prompt in UNIQUE:
        torch.testing.assert_close(rows[prompt], uninterrupted[prompt], rtol=1e-3, atol=1e-3)


def test_output_holding_another_dataset_is_refused(files, uninterrupted):
    out = files["root"] / "other"
    generate_ode_pairs.main(_argv(files, out))
    with pytest.raises(ValueError, match=r"different settings \(seed: 0 there vs 1 now\)"):
        generate_ode_pairs.main([*_argv(files, out), "--seed", "1"])
    # --append accepts it; every prompt is already there, so nothing is written
    assert generate_ode_pairs.main([*_argv(files, out), "--seed", "1", "--append"]) == 0

    foreign = files["root"] / "foreign"
    with LMDBWriter(foreign / "shard_0") as writer:
        writer.write("a prompt", np.zeros((len(KEEP), *LATENT), np.float16))
    with pytest.raises(ValueError, match="written by another job"):
        generate_ode_pairs.main(_argv(files, foreign))


def test_bad_prompt_files_are_named(files, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.txt: no prompts"):
        generate_ode_pairs.main([*_argv(files, tmp_path / "a"), "--prompts", str(empty)])
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("a caf\xe9 at dawn\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8"):
        generate_ode_pairs.main([*_argv(files, tmp_path / "b"), "--prompts", str(latin1)])


def test_random_tiny_teacher_is_seeded(files, tmp_path):
    base = [a for a in _argv(files, tmp_path / "r1") if a not in ("--weights", str(files["weights"]))]
    generate_ode_pairs.main(base)
    generate_ode_pairs.main([a if a != str(tmp_path / "r1") else str(tmp_path / "r2") for a in base])
    first, second = _rows(tmp_path / "r1"), _rows(tmp_path / "r2")
    for prompt in UNIQUE:
        assert torch.equal(first[prompt], second[prompt])
    with pytest.raises(ValueError, match="--weights is required for --model wan2.1-t2v-1.3b"):
        generate_ode_pairs.main([*base, "--model", "wan2.1-t2v-1.3b", "--out", str(tmp_path / "r3")])
