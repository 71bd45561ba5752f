"""Datasets, sampler and loader: prompt parsing, LMDB items, exact resume, shard coverage."""

import itertools

import numpy as np
import pytest
import torch

from tests.lmdb_helpers import write_upstream_env
from utils.dataset import (
    LatentLMDBDataset,
    ODERegressionLMDBDataset,
    StatefulDistributedSampler,
    TextDataset,
    check_row_shape,
    collate_batch,
    infinite_loader,
    shard_indices,
)

K1, F, C, H, W = 3, 2, 4, 4, 6  # tiny [K+1, F, C, H, W]


# 1. TextDataset ----------------------------------------------------------------------------------------


def test_text_dataset_strips_and_drops_blank_lines(tmp_path, caplog):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa cat  \r\n\nthe sea\t\n   \nüber alles\n".encode())
    ext = tmp_path / "ext.txt"
    ext.write_text("A long cat.\n\nA long sea.\n\nA long über.\n", encoding="utf-8")
    with caplog.at_level("WARNING"):
        ds = TextDataset(path, ext)
    assert "dropped 2 blank lines" in caplog.text
    assert len(ds) == 3
    assert [ds[i]["prompts"] for i in range(3)] == ["a cat", "the sea", "über alles"]
    assert ds[2] == {"prompts": "über alles", "idx": 2, "extended_prompts": "A long über."}
    assert ds.line_numbers == [1, 3, 5]


def test_text_dataset_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.txt: no prompts"):
        TextDataset(empty)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts"):
        TextDataset(blank)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8 at byte 8 \(line 2\)"):
        TextDataset(latin)
    good = tmp_path / "good.txt"
    good.write_text("a\nb\nc\n")
    short = tmp_path / "short.txt"
    short.write_text("A\nB\n")
    with pytest.raises(ValueError, match=r"short\.txt has 2 lines but .*good\.txt has 3"):
        TextDataset(good, short)
    holes = tmp_path / "holes.txt"
    holes.write_text("A\n\nC\n")
    with pytest.raises(ValueError, match=r"holes\.txt: line 2 is blank"):
        TextDataset(good, holes)


# 2. LMDB datasets --------------------------------------------------------------------------------------


def test_ode_dataset_items(tmp_path):
    rows = np.random.default_rng(0).standard_normal((4, K1, F, C, H, W)).astype(np.float16)
    prompts = [f"prompt {i}" for i in range(4)]
    write_upstream_env(tmp_path / "ode", rows, prompts)
    ds = ODERegressionLMDBDataset(tmp_path / "ode")
    assert len(ds) == 4 and ds.row_shape == (K1, F, C, H, W)
    item = ds[2]
    assert set(item) == {"prompts", "ode_latent", "idx"}
    assert item["prompts"] == "prompt 2" and item["idx"] == 2
    assert item["ode_latent"].dtype == torch.float32
    np.testing.assert_array_equal(item["ode_latent"].numpy(), rows[2].astype(np.float32))
    assert len(ODERegressionLMDBDataset(tmp_path / "ode", max_pair=3)) == 3
    with pytest.raises(IndexError):
        ODERegressionLMDBDataset(tmp_path / "ode", max_pair=3)[3]


def test_ode_dataset_from_shards(tmp_path):
    rows = np.random.default_rng(1).standard_normal((5, K1, F, C, H, W)).astype(np.float16)
    write_upstream_env(tmp_path / "root" / "shard_0", rows[:2], ["a", "b"])
    write_upstream_env(tmp_path / "root" / "shard_1", rows[2:], ["c", "d", "e"])
    ds = ODERegressionLMDBDataset(tmp_path / "root")
    assert [ds[i]["prompts"] for i in range(5)] == list("abcde")
    np.testing.assert_array_equal(ds[3]["ode_latent"].numpy(), rows[3].astype(np.float32))


def test_ode_dataset_rejects_clean_latent_rows(tmp_path):
    write_upstream_env(tmp_path / "clean", np.zeros((2, F, C, H, W)), ["a", "b"])
    with pytest.raises(ValueError, match=r"\(2, 4, 4, 6\).*\[K\+1, F, C, H, W\]"):
        ODERegressionLMDBDataset(tmp_path / "clean")


def test_latent_dataset_upstream_sharded_rows(tmp_path):
    # upstream's 14B shards: 4-D rows [F, C, H, W] and prompts_shape "N F C H W"
    rows = np.random.default_rng(2).standard_normal((3, F, C, H, W)).astype(np.float16)
    write_upstream_env(tmp_path / "root" / "shard_0", rows[:1], ["x"], full_prompt_shape=True)
    write_upstream_env(tmp_path / "root" / "shard_1", rows[1:], ["y", "z"], full_prompt_shape=True)
    ds = LatentLMDBDataset(tmp_path / "root", with_image_latent=True)
    assert len(ds) == 3 and ds.row_shape == (F, C, H, W)
    item = ds[1]
    assert item["prompts"] == "y"
    np.testing.assert_array_equal(item["clean_latent"].numpy(), rows[1].astype(np.float32))
    assert item["image_latent"].shape == (1, C, H, W)
    np.testing.assert_array_equal(item["image_latent"][0].numpy(), rows[1, 0].astype(np.float32))


def test_latent_dataset_from_trajectories_takes_clean_end(tmp_path):
    rows = np.random.default_rng(3).standard_normal((2, K1, F, C, H, W)).astype(np.float16)
    write_upstream_env(tmp_path / "ode", rows, ["a", "b"])
    ds = LatentLMDBDataset(tmp_path / "ode")
    assert ds.row_shape == (F, C, H, W) and "image_latent" not in ds[0]
    np.testing.assert_array_equal(ds[1]["clean_latent"].numpy(), rows[1, K1 - 1].astype(np.float32))


def test_check_row_shape(tmp_path):
    write_upstream_env(tmp_path / "ode", np.zeros((1, K1, F, C, H, W)), ["a"])
    ds = ODERegressionLMDBDataset(tmp_path / "ode")
    check_row_shape(ds, (K1, F, C, H, W), "ode_latent")
    check_row_shape(ds, (None, F, C, H, W), "ode_latent")
    with pytest.raises(
        ValueError, match=r"ode_latent \[K\+1, F, C, H, W\]: .*\(3, 2, 4, 4, 6\).*\(3, 2, 4, 8, 6\)"
    ):
        check_row_shape(ds, (K1, F, C, 2 * H, W), "ode_latent [K+1, F, C, H, W]")
    with pytest.raises(ValueError, match=r"\(\*, 2, 4, 4\)"):
        check_row_shape(ds, (None, F, C, H), "ode_latent")


# 3. Collate and loader ---------------------------------------------------------------------------------


def test_collate_batch():
    items = [{"prompts": f"p{i}", "x": torch.full((2, 3), float(i)), "idx": i} for i in range(3)]
    batch = collate_batch(items)
    assert batch["prompts"] == ["p0", "p1", "p2"]
    assert batch["x"].shape == (3, 2, 3) and torch.equal(batch["x"][2], items[2]["x"])
    assert torch.equal(batch["idx"], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="different keys"):
        collate_batch([{"a": 1}, {"b": 1}])


class RangeDataset(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx: int) -> dict:
        return {"prompts": f"p{idx}", "x": torch.tensor([float(idx)]), "idx": idx}


@pytest.mark.parametrize("world_size,rank,batch_size", [(1, 0, 3), (3, 2, 2)])
def test_loader_resume_matches_uninterrupted(world_size, rank, batch_size):
    ds = RangeDataset(11)

    def make():
        return StatefulDistributedSampler(len(ds), rank, world_size, shuffle=True, seed=5)

    reference = list(itertools.islice(infinite_loader(ds, make(), batch_size), 12))
    sampler = make()
    loader = infinite_loader(ds, sampler, batch_size)
    first = [next(loader) for _ in range(5)]
    state = sampler.state_dict()
    next(loader)  # progress after the checkpoint is lost, as in a crash
    resumed_sampler = make()
    resumed_sampler.load_state_dict(state)
    resumed = list(itertools.islice(infinite_loader(ds, resumed_sampler, batch_size), 7))
    for got, want in zip(first + resumed, reference):
        assert got["prompts"] == want["prompts"]
        assert torch.equal(got["x"], want["x"])
    # every batch holds exactly the items the sampler handed out, in order
    stream = list(itertools.islice(iter(make()), 12 * batch_size))
    assert [p for b in reference for p in b["prompts"]] == [f"p{i}" for i in stream]


# 4. Sampler and sharding -------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle,drop_last", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("consumed", [0, 3, 7, 8, 20])
def test_sampler_resume_continues_exactly(shuffle, drop_last, consumed):
    n, world_size, rank = 10, 3, 1

    def make():
        return StatefulDistributedSampler(n, rank, world_size, shuffle=shuffle, seed=11, drop_last=drop_last)

    uninterrupted = list(itertools.islice(iter(make()), consumed + 15))
    sampler = make()
    it = iter(sampler)
    head = [next(it) for _ in range(consumed)]
    state = sampler.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    tail = list(itertools.islice(iter(resumed), 15))
    assert head + tail == uninterrupted


@pytest.mark.parametrize("n,world_size", [(10, 1), (10, 3), (7, 4), (12, 4)])
def test_sampler_epochs_partition_and_reshuffle(n, world_size):
    per_rank = n // world_size
    epochs = 4
    streams = []
    for rank in range(world_size):
        sampler = StatefulDistributedSampler(n, rank, world_size, shuffle=True, seed=3)
        streams.append(list(itertools.islice(iter(sampler), per_rank * epochs)))
        # the sampler moved itself into the last epoch (upstream never called set_epoch, §9.18)
        assert sampler.epoch == epochs - 1 and sampler.position == per_rank
    orders = []
    for e in range(epochs):
        chunks = [s[e * per_rank : (e + 1) * per_rank] for s in streams]
        seen = [i for chunk in chunks for i in chunk]
        # within an epoch, ranks are disjoint and together take floor(n / ws) * ws distinct indices
        assert len(set(seen)) == len(seen) == per_rank * world_size
        assert all(0 <= i < n for i in seen)
        orders.append(chunks)
    assert any(orders[e] != orders[0] for e in range(1, epochs)), "every epoch used the same permutation"


def test_sampler_without_drop_last_covers_every_index_each_epoch():
    n, world_size = 10, 4  # 3 per rank, 2 duplicates padded
    for epoch in range(3):
        seen = []
        for rank in range(world_size):
            s = StatefulDistributedSampler(n, rank, world_size, shuffle=True, seed=0, drop_last=False)
            seen += s.epoch_indices(epoch)
        assert set(seen) == set(range(n)) and len(seen) == 12


def test_sampler_state_mismatch_errors():
    state = StatefulDistributedSampler(10, seed=1).state_dict()
    with pytest.raises(ValueError, match="dataset_len=10"):
        StatefulDistributedSampler(11, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=1"):
        StatefulDistributedSampler(10, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="rank 2 out of range"):
        StatefulDistributedSampler(10, rank=2, world_size=2)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("n", [0, 1, 4, 7, 13, 64])
def test_shard_indices_cover_each_index_once(n, world_size):
    shards = [shard_indices(n, rank, world_size) for rank in range(world_size)]
    flat = [i for shard in shards for i in shard]
    assert sorted(flat) == list(range(n))
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


def test_sampler_world_size_change_resumes_at_same_fraction(caplog):
    old = StatefulDistributedSampler(24, rank=0, world_size=2, seed=4)
    it = iter(old)
    for _ in range(12 + 3):  # epoch 0 done (12 per rank), 3 into epoch 1 = 6 of 24 indices overall
        next(it)
    new = StatefulDistributedSampler(24, rank=1, world_size=4, seed=4)
    with caplog.at_level("WARNING"):
        new.load_state_dict(old.state_dict())
    assert "world_size 2, now 4" in caplog.text
    # 6 of 24 indices consumed across 4 ranks -> 1.5 each, rounded down
    assert (new.epoch, new.position) == (1, 1)
