"""LMDB layer: upstream layout compatibility, round trips, append/resume, crash safety, clear errors."""

import multiprocessing
import pickle
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

import utils.lmdb as lmdb_mod
from tests.lmdb_helpers import write_upstream_env
from utils.lmdb import LMDBFormatError, LMDBReader, LMDBWriter, read_done_keys, shard_path

ROW = (3, 2, 4, 4, 6)  # [K+1, F, C, H, W], tiny


def raw_get(path: Path, key: bytes) -> bytes | None:
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        value = txn.get(key)
    env.close()
    return value


def test_reads_upstream_single_env(tmp_path):
    rows = np.random.default_rng(0).standard_normal((4, *ROW)).astype(np.float16)
    prompts = [f"a prompt {i} — ünïcode" for i in range(4)]
    write_upstream_env(tmp_path / "db", rows, prompts)
    reader = LMDBReader(tmp_path / "db")
    assert len(reader) == 4 and reader.row_shape == ROW
    for i in range(4):
        np.testing.assert_array_equal(reader.latent(i), rows[i])
        assert reader.prompt(i) == prompts[i]
    with pytest.raises(IndexError):
        reader.latent(4)


def test_directory_of_shards_reads_as_one_in_natural_order(tmp_path):
    # Upstream's sharded layout: 4-D rows, both shape keys "N F C H W"; 11 shards so that
    # lexicographic order (shard_1, shard_10, shard_2, ...) would differ from the true one.
    rng = np.random.default_rng(1)
    expected_rows, expected_prompts = [], []
    for k in range(11):
        n = 1 + k % 2
        rows = rng.standard_normal((n, *ROW[1:])).astype(np.float16)
        prompts = [f"shard {k} row {j}" for j in range(n)]
        write_upstream_env(tmp_path / "root" / f"shard_{k}", rows, prompts, full_prompt_shape=True)
        expected_rows += list(rows)
        expected_prompts += prompts
    reader = LMDBReader(tmp_path / "root")
    assert len(reader) == len(expected_rows) and reader.row_shape == ROW[1:]
    for i, (row, prompt) in enumerate(zip(expected_rows, expected_prompts)):
        assert reader.prompt(i) == prompt
        np.testing.assert_array_equal(reader.latent(i), row)


def test_shards_with_different_row_shapes_are_rejected(tmp_path):
    write_upstream_env(tmp_path / "root" / "shard_0", np.zeros((1, 2, 3)), ["a"])
    write_upstream_env(tmp_path / "root" / "shard_1", np.zeros((1, 2, 4)), ["b"])
    with pytest.raises(LMDBFormatError, match="different shapes"):
        LMDBReader(tmp_path / "root")


def test_writer_reader_round_trip(tmp_path):
    latents = torch.randn(5, *ROW)
    prompts = [f"p{i}" for i in range(5)]
    with LMDBWriter(tmp_path / "db") as writer:
        writer.write_many(prompts[:3], latents[:3])
        assert writer.write(prompts[3], latents[3]) == 3
        writer.write(prompts[4], latents[4].numpy(), key="video_4.mp4")
    # Shape keys in upstream's exact format, checked with raw lmdb.
    assert raw_get(tmp_path / "db", b"latents_shape") == b"5 3 2 4 4 6"
    assert raw_get(tmp_path / "db", b"prompts_shape") == b"5"
    reader = LMDBReader(tmp_path / "db")
    assert len(reader) == 5 and reader.row_shape == ROW
    for i in range(5):
        stored = reader.latent(i)
        assert stored.dtype == np.float16
        # the stored value is torch's own float16 rounding, i.e. within fp16 precision of the input
        np.testing.assert_array_equal(stored, latents[i].half().numpy())
        np.testing.assert_allclose(stored.astype(np.float32), latents[i].numpy(), rtol=1e-3, atol=1e-4)
        assert reader.prompt(i) == prompts[i]
    assert [reader.key(i) for i in range(5)] == prompts[:4] + ["video_4.mp4"]


def test_append_resume_and_shape_refusal(tmp_path):
    path = tmp_path / "db"
    a, b, c = torch.randn(3, *ROW)
    with LMDBWriter(path) as writer:
        writer.write_many(["a", "b"], torch.stack([a, b]))
    with pytest.raises(LMDBFormatError, match="append=True"):
        LMDBWriter(path)
    with pytest.raises(LMDBFormatError, match=r"\(3, 2, 4, 4, 6\).*\(3, 2, 4, 4, 7\)"):
        LMDBWriter(path, append=True, row_shape=(3, 2, 4, 4, 7))
    with LMDBWriter(path, append=True) as writer:
        assert len(writer) == 2 and writer.row_shape == ROW
        assert writer.contains("a") and writer.contains("b") and not writer.contains("c")
        with pytest.raises(LMDBFormatError, match=r"'c'.*shape \(2, 4, 4, 6\)"):
            writer.write("c", c[0])
        writer.write("c", c)
    reader = LMDBReader(path)
    assert [reader.prompt(i) for i in range(3)] == ["a", "b", "c"]
    np.testing.assert_array_equal(reader.latent(2), c.half().numpy())


def test_map_grows_when_full(tmp_path):
    rows = torch.randn(20, 64, 64)  # 8 KiB per fp16 row, 160 KiB in all
    with LMDBWriter(tmp_path / "db", map_size=64 * 1024) as writer:
        for i, row in enumerate(rows):
            writer.write(f"p{i}", row)
    reader = LMDBReader(tmp_path / "db")
    assert len(reader) == 20
    np.testing.assert_array_equal(reader.latent(19), rows[19].half().numpy())


def test_non_finite_row_is_rejected(tmp_path):
    with LMDBWriter(tmp_path / "db") as writer, pytest.raises(LMDBFormatError, match="non-finite"):
        writer.write("too big", torch.full((2, 2), 1e6))  # overflows float16


def _write_then_crash(path: str) -> None:
    writer = LMDBWriter(path)
    writer.write_many(["a", "b"], torch.ones(2, 2, 3))
    real_prompt_key = lmdb_mod.prompt_key

    def dying_prompt_key(i: int) -> bytes:
        if i == 3:  # row 2 is fully in the transaction, row 3 half: die before the commit
            import os

            os._exit(3)
        return real_prompt_key(i)

    lmdb_mod.prompt_key = dying_prompt_key
    writer.write_many(["c", "d"], torch.ones(2, 2, 3))


def test_crash_mid_write_leaves_no_partial_rows(tmp_path):
    path = tmp_path / "db"
    proc = multiprocessing.get_context("fork").Process(target=_write_then_crash, args=(str(path),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 3
    assert raw_get(path, b"latents_2_data") is None and raw_get(path, b"latents_3_data") is None
    reader = LMDBReader(path)
    assert len(reader) == 2
    with LMDBWriter(path, append=True) as writer:
        assert len(writer) == 2 and writer.done_keys() == {"a", "b"}
        writer.write("c", torch.zeros(2, 3))
    assert LMDBReader(path).prompt(2) == "c"


def test_missing_row_key_names_the_key(tmp_path):
    path = tmp_path / "db"
    write_upstream_env(path, np.zeros((2, 2, 3)), ["a", "b"])
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        txn.delete(b"latents_1_data")
        txn.delete(b"prompts_0_data")
    env.close()
    reader = LMDBReader(path)
    with pytest.raises(LMDBFormatError, match="latents_1_data"):
        reader.latent(1)
    with pytest.raises(LMDBFormatError, match="prompts_0_data"):
        reader.prompt(0)


@pytest.mark.parametrize("key", [b"latents_shape", b"prompts_shape"])
def test_missing_shape_key_names_the_key(tmp_path, key):
    path = tmp_path / "db"
    write_upstream_env(path, np.zeros((2, 2, 3)), ["a", "b"])
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        txn.delete(key)
    env.close()
    with pytest.raises(LMDBFormatError, match=f"missing key '{key.decode()}'"):
        LMDBReader(path)


def test_empty_shape_key_from_upstream_bug_is_named(tmp_path):
    # Upstream §9.8: the last file's prompt was a duplicate, so the shape keys were written empty.
    path = tmp_path / "db"
    write_upstream_env(path, np.zeros((2, 2, 3)), ["a", "b"])
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        txn.put(b"latents_shape", b"")
    env.close()
    with pytest.raises(LMDBFormatError, match="latents_shape"):
        LMDBReader(path)
    with pytest.raises(LMDBFormatError, match="latents_shape"):
        LMDBWriter(path, append=True)


def test_truncated_row_names_the_key(tmp_path):
    path = tmp_path / "db"
    rows = np.ones((2, 2, 3), dtype=np.float16)
    write_upstream_env(path, rows, ["a", "b"])
    env = lmdb.open(str(path))
    with env.begin(write=True) as txn:
        txn.put(b"latents_1_data", rows[1].tobytes()[:-2])
    env.close()
    reader = LMDBReader(path)
    np.testing.assert_array_equal(reader.latent(0), rows[0])
    with pytest.raises(LMDBFormatError, match=r"latents_1_data.*10 bytes, expected 12"):
        reader.latent(1)


def test_corrupt_env_is_named(tmp_path):
    path = tmp_path / "db"
    path.mkdir()
    (path / "data.mdb").write_bytes(b"not an lmdb file" * 512)
    with pytest.raises(LMDBFormatError, match=str(path)):
        LMDBReader(path)
    with pytest.raises(LMDBFormatError, match="no such"):
        LMDBReader(tmp_path / "missing")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(LMDBFormatError, match="neither"):
        LMDBReader(tmp_path / "empty_dir")


def test_per_rank_shards_and_done_keys(tmp_path):
    out = tmp_path / "out"
    assert read_done_keys(out) == set()
    prompts = [f"prompt {i}" for i in range(7)]
    world = 3
    for rank in range(world):
        with LMDBWriter(shard_path(out, rank)) as writer:
            for i in range(rank, len(prompts), world):
                writer.write(prompts[i], torch.full((2, 3), float(i)))
    # an idle rank leaves an empty environment, which reads as zero rows
    LMDBWriter(shard_path(out, world)).close()
    assert read_done_keys(out) == set(prompts)
    reader = LMDBReader(out)
    assert len(reader) == 7
    values = {reader.prompt(i): float(reader.latent(i)[0, 0]) for i in range(7)}
    assert values == {p: float(i) for i, p in enumerate(prompts)}
    # reader survives pickling (DataLoader workers), re-opening its environments
    clone = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(clone.latent(6), reader.latent(6))


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.05, 0.0])
def test_truncated_data_mdb_is_a_clear_error_not_a_bus_error(tmp_path, keep):
    # Reading through the memory map past the end of a truncated file is SIGBUS, which would kill
    # the test process itself; the reader must refuse before any page is touched, naming the file.
    import os

    with LMDBWriter(tmp_path / "env") as writer:
        for i in range(6):
            writer.write(f"p{i}", np.random.default_rng(i).standard_normal((4, 3, 8, 8)))
    mdb = tmp_path / "env" / "data.mdb"
    os.truncate(mdb, int(mdb.stat().st_size * keep))
    with pytest.raises(LMDBFormatError, match=str(mdb)):
        reader = LMDBReader(tmp_path / "env")
        [reader.latent(i) for i in range(len(reader))]
