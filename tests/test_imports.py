"""The import rule of docs/DESIGN.md, checked over the source with `ast` (every import statement,
at module level or inside a function): `utils <- wan <- pipeline <- model <- world <- entry points`
(`train.py`, `inference.py`, `scripts/`, and `recipe/`, the trainer's pieces). A module imports only
from its own layer or below, and the modules of the project import one another without a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    "utils": 0,
    "wan": 1,
    "pipeline": 2,
    "model": 3,
    "world": 4,
    "train": 5,
    "inference": 5,
    "scripts": 5,
    "recipe": 5,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    files = [ROOT / "train.py", ROOT / "inference.py"]
    for package in ("utils", "wan", "pipeline", "model", "world", "recipe", "scripts"):
        files += sorted((ROOT / package).rglob("*.py"))
    return {_module_name(f): f for f in files}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports (`from a.b import c` counts a.b.c when that is a module)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:  # the longest prefix that is a project module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    return {name: _imports(name, path, set(sources)) for name, path in sources.items()}


def test_imports_run_one_way():
    bad = []
    for name, targets in _graph().items():
        for target in targets:
            if LAYERS[target.split(".")[0]] > LAYERS[name.split(".")[0]]:
                bad.append(f"{name} imports {target}")
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:  # nxt is on the current path: a cycle through it
                cycles.append(" -> ".join([*path[path.index(nxt) :], node, nxt]))
            elif nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_resolves_absolute_relative_and_lazy_imports(tmp_path):
    """`_imports` on a probe file posing as `utils.a`: an absolute, a relative and a lazy import."""
    probe = tmp_path / "a.py"
    probe.write_text(
        "from world.b import x\nfrom . import c\n\ndef f():\n    import model.d\n", encoding="utf-8"
    )
    known = {"utils", "utils.a", "utils.c", "world", "world.b", "model", "model.d"}
    assert _imports("utils.a", probe, known) == {"world.b", "utils", "utils.c", "model.d"}


def test_entry_points_import_transformers_and_diffusers_only_when_they_build_with_them():
    """train.py, inference.py and the world's chain start without transformers and diffusers (seconds
    of import each, paid by every process of a run and every subprocess of this suite); the lazy names
    still resolve to the real classes."""
    import subprocess
    import sys

    code = (
        "import sys, runpy\n"
        "import train, inference, model.build, pipeline, world.chain\n"
        "heavy = sorted(m for m in ('transformers', 'diffusers', 'peft') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "from wan import WanTextEncoder, WanVAE, StreamingDecoder\n"
        "assert WanVAE.__module__ == 'wan.vae' and WanTextEncoder.__module__ == 'wan.text_encoder'\n"
        "assert 'transformers' in sys.modules and 'diffusers' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
