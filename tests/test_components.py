"""Components by import path (utils/components.py): a role given as `{_component_: dotted.path, ...}`.

A user's closed-form real score, defined in tests/closed_form.py (not in world/) and named only by its
dotted path, trains a tiny DMD run and resumes bitwise as an uninterrupted run; a path that does not
import, keyword arguments the factory does not take, and an object without the role's interface are
each one error naming the key, before anything is trained or written.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import train as train_module
from model.build import build_vae, wan_config
from tests.closed_form import GaussianTeacher
from tests.test_hardening import _one_process  # noqa: F401 (autouse: one process, signal handlers restored)
from tests.test_train import ROOT, load_checkpoint, weights
from utils.config import ConfigError, load_config
from utils.errors import USER_ERROR_EXIT_CODE
from wan import WanConfig

QUIET = ["sample_every=0", "wandb_mode=disabled", "log_iters=2", "dfake_gen_update_ratio=1"]
TEACHER = "real_score_model={_component_: tests.closed_form.GaussianTeacher, variance: 0.5}"
CORE = ("wan", "pipeline", "model", "utils", "train.py")


def run(logdir: Path, overrides: list[str]) -> int:
    argv = ["--config", str(ROOT / "configs/tiny_dmd.yaml"), "--logdir", str(logdir), *QUIET, *overrides]
    return train_module.main(argv)


def test_a_closed_form_real_score_by_dotted_path_trains_and_resumes_bitwise(tmp_path):
    GaussianTeacher.calls = 0
    assert run(tmp_path / "split", [TEACHER, "max_steps=2"]) == 0
    assert GaussianTeacher.calls > 0, "the trainer did not use the component as its real score"
    assert run(tmp_path / "split", [TEACHER, "max_steps=4"]) == 0
    assert run(tmp_path / "once", [TEACHER, "max_steps=4"]) == 0
    a, b = weights(load_checkpoint(tmp_path / "once", 4)), weights(load_checkpoint(tmp_path / "split", 4))
    assert a.keys() == b.keys() and any(k.startswith("critic.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The run record keeps the component as it was given.
    saved = load_config(tmp_path / "split" / "config.yaml")
    assert saved.real_score_model == {"_component_": "tests.closed_form.GaussianTeacher", "variance": 0.5}


@pytest.mark.parametrize(
    "override, culprits",
    [
        (
            "real_score_model={_component_: tests.no_such_module.Teacher}",
            ["real_score_model", "has no 'no_such_module'"],
        ),
        (
            "real_score_model={_component_: tests.closed_form.NoSuchClass}",
            ["real_score_model", "no 'NoSuchClass'"],
        ),
        (
            "real_score_model={_component_: tests.closed_form.GaussianTeacher, width: 3}",
            ["real_score_model", "width"],
        ),
        ("real_score_model={_component_: tests.closed_form.OneArgument}", ["real_score_model", "interface"]),
        (
            "real_score_model={_component_: tests.closed_form.not_a_network}",
            ["real_score_model", "returned a str"],
        ),
        (
            "generator_model={_component_: tests.closed_form.GaussianTeacher}",
            ["generator_model", "WanConfig"],
        ),
        ("text_encoder={_component_: tests.closed_form.WideTextTable}", ["text_encoder", "32"]),
        ("real_score_model={variance: 0.5}", ["real_score_model", "_component_"]),
    ],
    ids=[
        "no-module",
        "no-attribute",
        "bad-kwargs",
        "no-interface",
        "not-a-network",
        "generator-module",
        "text-dim",
        "no-factory",
    ],  # fmt: skip
)
def test_a_bad_component_is_one_error_naming_the_key_before_training(tmp_path, capsys, override, culprits):
    capsys.readouterr()
    assert run(tmp_path, [override, "max_steps=1"]) == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert all(c in line for c in culprits), line
    assert "Traceback" not in err
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "checkpoints").exists()


def test_a_vae_component_without_decode_is_refused_by_name():
    cfg = load_config(ROOT / "configs/tiny_dmd.yaml", ["vae={_component_: tests.closed_form.EncodeOnly}"])
    with pytest.raises(ConfigError, match=r"^vae: tests\.closed_form\.EncodeOnly .* without decode\(\)"):
        build_vae(cfg, torch.device("cpu"))


def test_presets_and_components_give_the_same_network():
    """A preset string and a component returning the same WanConfig are one network to the core."""
    preset = load_config(ROOT / "configs/tiny_dmd.yaml", [])
    component = load_config(ROOT / "configs/tiny_dmd.yaml", ["fake_score_model={_component_: wan.WanConfig.preset, name: tiny}"])  # fmt: skip
    assert wan_config(component, "fake_score") == wan_config(preset, "fake_score") == WanConfig.preset("tiny")


def test_the_core_never_names_the_shapes_world():
    """`grep -rn world wan pipeline model utils train.py` finds only world_size-style distributed names."""
    allowed = re.compile(r"(local_)?world_size|WORLD_SIZE|world\s+size", re.IGNORECASE)
    hits = []
    for root in CORE:
        path = ROOT / root
        for file in [path] if path.is_file() else sorted(path.rglob("*.py")):
            text = allowed.sub("", file.read_text(encoding="utf-8"))
            for number, line in enumerate(text.splitlines(), 1):
                if "world" in line.lower():
                    hits.append(f"{file.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)
