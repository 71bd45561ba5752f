"""Datasets, the resumable distributed sampler and the batch loader (spec §7).

* ``TextDataset``: prompt lists (one prompt per line), for DMD/SiD training, ODE-pair generation and
  inference.
* ``ODERegressionLMDBDataset``: ODE trajectories ``[K+1, F, C, H, W]`` (noise -> clean) for ODE
  regression (§5.6).
* ``LatentLMDBDataset``: clean latents ``[F, C, H, W]`` of real or teacher videos (GAN, diffusion, I2V).
* ``StatefulDistributedSampler`` + ``infinite_loader``: endless, per-epoch reshuffled training stream whose
  position is checkpointed, so a resumed run sees exactly the batches an uninterrupted run would have.
* ``shard_indices``: the no-drop, no-duplicate split used by generation and inference.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from utils.lmdb import LMDBReader

logger = logging.getLogger(__name__)

_UTF8_BOM = b"\xef\xbb\xbf"


# 1. Text prompts -------------------------------------------------------------------------------------


def _read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file, trailing whitespace (and CR of CRLF) stripped."""
    data = path.read_bytes()
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM) :]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}: not UTF-8 at byte {err.start} (line {line}): {err.reason}") from err
    # Split on "\n" only: str.splitlines() would also split on characters such as U+2028 that may
    # legitimately appear inside a scraped prompt.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip() for line in lines]


class TextDataset(Dataset):
    """Prompts from a text file, one per line; item ``{"prompts": str, "idx": int}``.

    With ``extended_prompt_path`` (a file aligned line by line, e.g. LLM-extended prompts) items also
    carry ``"extended_prompts"``. Blank lines are dropped (with a logged count) rather than kept as
    empty prompts as upstream does: an empty prompt is almost always an editing accident. ``idx`` is
    the position among the kept prompts; ``line_numbers[idx]`` is its 1-based line in the file.
    """

    def __init__(self, prompt_path: str | os.PathLike, extended_prompt_path: str | os.PathLike | None = None):
        self.path = Path(prompt_path)
        lines = _read_lines(self.path)
        extended = None
        if extended_prompt_path is not None:
            ext_path = Path(extended_prompt_path)
            extended = _read_lines(ext_path)
            if len(extended) != len(lines):
                raise ValueError(
                    f"{ext_path} has {len(extended)} lines but {self.path} has {len(lines)}; "
                    "extended prompts must align line by line"
                )
        keep = [i for i, line in enumerate(lines) if line]
        if not keep:
            raise ValueError(f"{self.path}: no prompts (file is empty or blank)")
        if len(keep) < len(lines):
            logger.warning("%s: dropped %d blank lines", self.path, len(lines) - len(keep))
        if extended is not None:
            for i in keep:
                if not extended[i]:
                    raise ValueError(f"{extended_prompt_path}: line {i + 1} is blank but its prompt is not")
        self.prompts = [lines[i] for i in keep]
        self.extended_prompts = None if extended is None else [extended[i] for i in keep]
        self.line_numbers = [i + 1 for i in keep]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        item: dict[str, Any] = {"prompts": self.prompts[idx], "idx": idx}
        if self.extended_prompts is not None:
            item["extended_prompts"] = self.extended_prompts[idx]
        return item


# 2. LMDB latents -------------------------------------------------------------------------------------


class _LMDBRows(Dataset):
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.reader = LMDBReader(self.path)
        if len(self.reader) == 0:
            raise ValueError(f"{self.path}: LMDB dataset has no rows")

    def _check_index(self, idx: int) -> None:
        if not 0 <= idx < len(self):
            raise IndexError(f"{self.path}: index {idx} out of range for {len(self)} rows")


class ODERegressionLMDBDataset(_LMDBRows):
    """ODE trajectories for ODE regression (§5.6); item
    ``{"prompts": str, "ode_latent": float32 [K+1, F, C, H, W] (noise -> clean), "idx": int}``.

    ``path`` is one LMDB environment or a directory of shards; ``max_pair`` caps the length.
    """

    def __init__(self, path: str | os.PathLike, max_pair: int | None = None) -> None:
        super().__init__(path)
        shape = self.reader.row_shape
        if len(shape) != 5 or shape[0] < 2:
            raise ValueError(
                f"{self.path}: rows have shape {shape}; ODE regression needs trajectories "
                "[K+1, F, C, H, W] with K+1 >= 2 (clean-latent datasets load with LatentLMDBDataset)"
            )
        if max_pair is not None and max_pair < 1:
            raise ValueError(f"max_pair must be positive, got {max_pair}")
        self.row_shape: tuple[int, ...] = shape
        self._len = len(self.reader) if max_pair is None else min(len(self.reader), max_pair)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, idx: int) -> dict[str, Any]:
        self._check_index(idx)
        latent = torch.from_numpy(self.reader.latent(idx)).float()
        return {"prompts": self.reader.prompt(idx), "ode_latent": latent, "idx": idx}


class LatentLMDBDataset(_LMDBRows):
    """Clean latents; item ``{"prompts": str, "clean_latent": float32 [F, C, H, W], "idx": int}``.

    Rows may be ``[F, C, H, W]`` or 5-D ``[K+1, F, C, H, W]`` (upstream's sharded ``[1, F, C, H, W]``
    view, or an ODE trajectory), whose last entry along the first axis is the clean end, as upstream's
    trainers take ``ode_latent[:, -1]``. With ``with_image_latent`` items add ``"image_latent"``
    ``[1, C, H, W]``, the first latent frame: the Wan VAE is causal in time, so that frame is exactly the
    encoding of the first video frame alone, which is the I2V condition.
    """

    def __init__(self, path: str | os.PathLike, with_image_latent: bool = False) -> None:
        super().__init__(path)
        shape = self.reader.row_shape
        if len(shape) not in (4, 5):
            raise ValueError(
                f"{self.path}: rows have shape {shape}; expected [F, C, H, W] or [K+1, F, C, H, W]"
            )
        self.row_shape: tuple[int, ...] = shape[-4:]
        self.with_image_latent = with_image_latent

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        self._check_index(idx)
        row = self.reader.latent(idx)
        clean = torch.from_numpy(row[-1] if row.ndim == 5 else row).float()
        item: dict[str, Any] = {"prompts": self.reader.prompt(idx), "clean_latent": clean, "idx": idx}
        if self.with_image_latent:
            item["image_latent"] = clean[:1].clone()
        return item


def check_row_shape(dataset: Dataset, expected: Sequence[int | None], what: str) -> None:
    """Start-up check that ``dataset.row_shape`` (the item latent's shape) matches the config.

    ``expected`` holds the sizes derived from the config, e.g. ``(K+1, F, C, H, W)`` for ODE pairs or
    ``(F, C, H, W)`` for clean latents; ``None`` accepts any size on that axis. ``what`` names the
    tensor and its axes in the error.
    """
    actual = tuple(dataset.row_shape)
    if len(actual) != len(expected) or any(e is not None and e != a for e, a in zip(expected, actual)):
        wanted = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        where = getattr(dataset, "path", type(dataset).__name__)
        raise ValueError(f"{what}: {where} holds rows of shape {actual}, but the config expects {wanted}")


# 3. Batching -----------------------------------------------------------------------------------------


def collate_batch(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack dataset items: tensors -> ``[B, ...]``, ints -> long ``[B]``, strings -> ``list[str]``."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    keys = set(items[0])
    for item in items:
        if set(item) != keys:
            raise ValueError(f"cannot collate items with different keys: {sorted(keys)} vs {sorted(item)}")
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [item[key] for item in items]
        if all(isinstance(v, torch.Tensor) for v in values):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"cannot stack '{key}': items have shapes {sorted(shapes)}")
            batch[key] = torch.stack(values)
        elif all(isinstance(v, int) for v in values):
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = values
    return batch


def infinite_loader(
    dataset: Dataset,
    sampler: StatefulDistributedSampler,
    batch_size: int,
    collate: Callable[[Sequence[dict[str, Any]]], dict[str, Any]] = collate_batch,
) -> Iterator[dict[str, Any]]:
    """Endless batches of ``batch_size`` items (per rank) built in the calling process.

    Items are fetched only when a batch is requested (no worker prefetch), so after the trainer has
    taken ``n`` batches ``sampler.state_dict()`` points exactly after them.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    indices = iter(sampler)
    while True:
        yield collate([dataset[next(indices)] for _ in range(batch_size)])


# 4. Sampling and sharding ----------------------------------------------------------------------------


class StatefulDistributedSampler:
    """Endless per-rank index stream with a fresh permutation every epoch and checkpointable position.

    Epoch ``e`` uses ``randperm(dataset_len)`` seeded with ``seed + e`` (identical on every rank), cut to
    a multiple of ``world_size`` (``drop_last``) or padded by wrapping around, and dealt round-robin:
    rank ``r`` takes entries ``r, r + world_size, ...``. Unlike upstream (§9.18) the epoch advances by
    itself when one is exhausted. ``state_dict()`` is ``(epoch, position)`` plus the settings it is valid
    for; every rank holds the same state, so rank 0's copy suffices. Iterate one iterator at a time.
    """

    def __init__(
        self,
        dataset_len: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if dataset_len < 1:
            raise ValueError(f"dataset_len must be positive, got {dataset_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if drop_last and dataset_len < world_size:
            raise ValueError(f"drop_last with {dataset_len} items and {world_size} ranks leaves nothing")
        self.dataset_len, self.rank, self.world_size = dataset_len, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.num_samples = dataset_len // world_size if drop_last else -(-dataset_len // world_size)
        self.epoch = 0
        self.position = 0  # indices of the current epoch already handed out on this rank

    def __len__(self) -> int:
        """Indices per rank per epoch."""
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch``, in order."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.dataset_len, generator=generator).tolist()
        else:
            order = list(range(self.dataset_len))
        total = self.num_samples * self.world_size
        while len(order) < total:
            order += order[: total - len(order)]
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[int]:
        cached_epoch, indices = None, []
        while True:
            # Read the live state each step, so load_state_dict() also redirects a running iterator.
            if self.position >= self.num_samples:
                self.set_epoch(self.epoch + 1)
            if self.epoch != cached_epoch:
                cached_epoch, indices = self.epoch, self.epoch_indices(self.epoch)
            index = indices[self.position]
            self.position += 1
            yield index

    def state_dict(self) -> dict[str, int | bool]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "dataset_len": self.dataset_len,
            "world_size": self.world_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        for name in ("dataset_len", "seed", "shuffle", "drop_last"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"sampler state was saved with {name}={state[name]}, this run has {getattr(self, name)}"
                )
        position = int(state["position"])
        if state["world_size"] != self.world_size:
            # The deal across ranks changes, so exact continuation is impossible; resume at the same
            # fraction of the epoch instead.
            position = min(position * int(state["world_size"]) // self.world_size, self.num_samples)
            logger.warning(
                "sampler state saved with world_size %s, now %s: resuming epoch %s at position %s "
                "(approximately where it stopped)",
                state["world_size"],
                self.world_size,
                state["epoch"],
                position,
            )
        self.epoch, self.position = int(state["epoch"]), position


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Round-robin split of ``range(n)`` for generation and inference: every index on exactly one rank,
    none dropped, none duplicated (ranks may differ in length by one)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    return list(range(rank, n, world_size))
