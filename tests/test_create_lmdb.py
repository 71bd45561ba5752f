"""scripts/create_lmdb.py: .pt dumps -> upstream-layout LMDB, checked with raw lmdb reads."""

import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from scripts.create_lmdb import convert_pt_dir
from utils.lmdb import LMDBFormatError

ROW = (3, 2, 4, 4, 6)  # [K+1, F, C, H, W]
REPO = Path(__file__).resolve().parents[1]


def raw_dump(path: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        content = dict(txn.cursor())
    env.close()
    return content


def write_pt_files(root: Path, files: dict[str, dict[str, torch.Tensor]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        torch.save(content, root / name)


def expected_rows(files: dict[str, dict[str, torch.Tensor]], seen: set[str] = frozenset()) -> list:
    """First occurrence of each prompt, files in sorted name order (the rule spelled out)."""
    seen = set(seen)
    rows = []
    for name in sorted(files):
        for prompt, tensor in files[name].items():
            if prompt not in seen:
                seen.add(prompt)
                rows.append((prompt, tensor[0]))
    return rows


def check_lmdb(path: Path, rows: list) -> None:
    content = raw_dump(path)
    n = len(rows)
    assert content[b"latents_shape"] == f"{n} {' '.join(map(str, ROW))}".encode()
    assert content[b"prompts_shape"] == str(n).encode()
    for i, (prompt, tensor) in enumerate(rows):
        assert content[f"prompts_{i}_data".encode()] == prompt.encode()
        assert content[f"latents_{i}_data".encode()] == tensor.numpy().astype(np.float16).tobytes()
    assert f"latents_{n}_data".encode() not in content


def test_convert_dedups_and_keeps_shape_keys_when_last_file_is_duplicate(tmp_path):
    # Created out of name order; the last file (by name) only repeats an earlier prompt, which made
    # upstream write empty shape keys (§9.8).
    files = {
        "00002.pt": {"a dog": torch.randn(1, *ROW), "a cat": torch.randn(1, *ROW)},
        "00000.pt": {"a cat": torch.randn(1, *ROW)},
        "00001.pt": {"the sea": torch.randn(1, *ROW)},
        "00003.pt": {"the sea": torch.randn(1, *ROW)},
    }
    write_pt_files(tmp_path / "pt", files)
    assert convert_pt_dir(tmp_path / "pt", tmp_path / "db") == 3
    check_lmdb(tmp_path / "db", expected_rows(files))


def test_append_adds_only_new_prompts(tmp_path):
    first = {f"{i:05d}.pt": {f"prompt {i}": torch.randn(1, *ROW)} for i in range(3)}
    second = {"00000.pt": {"prompt 1": torch.randn(1, *ROW)}, "00001.pt": {"prompt 9": torch.randn(1, *ROW)}}
    write_pt_files(tmp_path / "first", first)
    write_pt_files(tmp_path / "second", second)
    convert_pt_dir(tmp_path / "first", tmp_path / "db")
    with pytest.raises(LMDBFormatError, match="append=True"):
        convert_pt_dir(tmp_path / "second", tmp_path / "db")
    assert convert_pt_dir(tmp_path / "second", tmp_path / "db", append=True) == 1
    check_lmdb(
        tmp_path / "db",
        expected_rows(first) + expected_rows(second, seen=set(p for p, _ in expected_rows(first))),
    )


def test_bad_inputs_name_the_file(tmp_path):
    write_pt_files(tmp_path / "batched", {"00000.pt": {"two rows": torch.randn(2, *ROW)}})
    with pytest.raises(LMDBFormatError, match=r"00000\.pt.*'two rows'.*\(2, 3, 2, 4, 4, 6\)"):
        convert_pt_dir(tmp_path / "batched", tmp_path / "db1")
    write_pt_files(
        tmp_path / "mixed",
        {"00000.pt": {"a": torch.randn(1, *ROW)}, "00001.pt": {"b": torch.randn(1, 2, 2, 4, 4, 6)}},
    )
    with pytest.raises(LMDBFormatError, match=r"00001\.pt.*'b'.*\(2, 2, 4, 4, 6\)"):
        convert_pt_dir(tmp_path / "mixed", tmp_path / "db2")
    # the failing file's rows never became visible
    assert raw_dump(tmp_path / "db2")[b"latents_shape"] == f"1 {' '.join(map(str, ROW))}".encode()
    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match="no .pt files"):
        convert_pt_dir(tmp_path / "none", tmp_path / "db3")


def test_cli(tmp_path):
    files = {f"{i:05d}.pt": {f"prompt {i}": torch.randn(1, *ROW)} for i in range(2)}
    write_pt_files(tmp_path / "pt", files)
    cmd = [sys.executable, "-m", "scripts.create_lmdb", "--data_path", str(tmp_path / "pt")]
    result = subprocess.run(
        [*cmd, "--lmdb_path", str(tmp_path / "db")], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "rows/s" in result.stderr
    check_lmdb(tmp_path / "db", expected_rows(files))
