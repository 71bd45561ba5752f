"""The README's toy-network data commands, run as written, produce what the tiny configs train on."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_helpers import subprocess_env
from utils.config import load_config
from utils.dataset import LatentLMDBDataset, ODERegressionLMDBDataset, check_row_shape

ROOT = Path(__file__).resolve().parents[1]


def _toy_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"The toy networks, end to end.*?```bash\n(.*?)```", text, re.S).group(1)
    return [
        shlex.split(line.split("  #")[0]) for line in block.splitlines() if line and not line.startswith("#")
    ]


@pytest.mark.parametrize("config, kind", [("tiny_ode", "ode"), ("tiny_gan", "latent")])
def test_readme_toy_data_commands_feed_the_tiny_configs(tmp_path, config, kind):
    data_cmds = [c for c in _toy_commands() if c[1].startswith("scripts/")]
    assert len(data_cmds) == 3
    for cmd in data_cmds:
        if (kind == "ode") != (cmd[1] == "scripts/generate_ode_pairs.py"):
            continue
        # repo files by absolute path, outputs (data/...) under tmp_path
        cmd = [
            sys.executable,
            *(str(ROOT / a) if a.startswith(("scripts/", "configs/")) else a for a in cmd[1:]),
        ]
        if cmd[1].endswith("scripts/make_toy_videos.py"):
            cmd += ["--num_videos", "3"]
        proc = subprocess.run(
            cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = load_config(ROOT / "configs" / f"{config}.yaml")
    f, c, h, w = cfg.latent_shape
    path = tmp_path / cfg.data_path
    if kind == "ode":
        check_row_shape(
            ODERegressionLMDBDataset(path), (len(cfg.denoising_step_list), f, c, h, w), "ode_latent"
        )
    else:
        check_row_shape(LatentLMDBDataset(path), (f, c, h, w), "clean_latent")
