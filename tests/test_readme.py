"""The README's Python API example runs as written, and its commands match CI."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_python_api_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Python API\n.*?```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    video = scope["video"]
    assert video.shape == (1, 4, 6, 8, 8) and torch.isfinite(video).all()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"Set up and run the tests:\n\n```bash\n(.*?)\n```", readme, re.S).group(1)
    assert command in (ROOT / ".ci" / "run").read_text()


def test_layout_lists_every_top_level_folder():
    """README's Layout names each folder of the repository (`name/`), so a newcomer finds every room."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    folders = sorted(
        p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith((".", "_")) and any(p.rglob("*.*"))
        and p.name not in ("runs", "data", "build") and not p.name.endswith(".egg-info")
    )  # fmt: skip
    missing = [name for name in folders if f"`{name}/`" not in layout]
    assert not missing, f"README Layout leaves out {missing}"
