"""LMDB storage of latents and prompts in upstream Self-Forcing's layout (spec §7.3).

One LMDB environment is a directory holding ``data.mdb``. Its keys (all bytes):

* ``latents_{i}_data``: raw float16 bytes of row ``i``, C-order, shape ``row_shape``.
* ``prompts_{i}_data``: the prompt of row ``i``, UTF-8.
* ``latents_shape``: ASCII ``"N d1 d2 ..."``: ``N`` committed rows, each of shape ``(d1, d2, ...)``.
* ``prompts_shape``: ASCII ``"N"`` (upstream's sharded writer stores ``"N d1 d2 ..."``; only ``N`` is read).
* ``keys_{i}_data`` (ours, optional): the job key of row ``i`` when it differs from the prompt, e.g. the
  source video of an encoded clip. Resumable jobs use it to skip finished work; upstream readers never
  look at it.

``N`` is the visibility rule: rows ``0..N-1`` are complete. Our writer writes a batch of rows and the new
``N`` in one transaction, so a crash can never expose a half-written row, and it never writes an empty
shape key (upstream bug §9.8).

There is deliberately no image-latent key: the Wan VAE is causal in time, so the first latent frame of a
video *is* the encoding of its first frame alone; I2V conditioning is sliced from the clean latent.

A directory whose subdirectories hold ``data.mdb`` files (``shard_0``, ``shard_1``, ... as written by one
writer per rank) reads as one dataset, shards concatenated in natural order of their names.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import lmdb
import numpy as np
import torch

from utils.errors import UserError

logger = logging.getLogger(__name__)

# LMDB reserves address space, not disk; the writer doubles it whenever a transaction runs out.
DEFAULT_MAP_SIZE = 1 << 30
LATENTS_SHAPE_KEY = b"latents_shape"
PROMPTS_SHAPE_KEY = b"prompts_shape"
ROW_DTYPE = np.float16

ArrayLike = np.ndarray | torch.Tensor


class LMDBFormatError(UserError, ValueError):
    """An LMDB dataset is missing, malformed, or does not match what the caller asked for."""


def latent_key(i: int) -> bytes:
    return f"latents_{i}_data".encode()


def prompt_key(i: int) -> bytes:
    return f"prompts_{i}_data".encode()


def job_key(i: int) -> bytes:
    return f"keys_{i}_data".encode()


def shard_path(root: str | os.PathLike, rank: int) -> Path:
    """The LMDB environment a distributed job's ``rank`` writes to: ``<root>/shard_{rank}``."""
    return Path(root) / f"shard_{rank}"


def _format_shape(n: int, row_shape: Sequence[int]) -> bytes:
    return " ".join(str(d) for d in (n, *row_shape)).encode("ascii")


def _parse_shape(raw: bytes | None, key: bytes, where: Path) -> tuple[int, ...]:
    name = key.decode()
    if raw is None:
        raise LMDBFormatError(f"{where}: missing key '{name}'")
    try:
        dims = tuple(int(d) for d in raw.decode("ascii").split())
    except (UnicodeDecodeError, ValueError) as err:
        raise LMDBFormatError(f"{where}: key '{name}' holds {raw[:64]!r}, not 'N d1 d2 ...'") from err
    if not dims or any(d < 0 for d in dims):
        # An empty value is what upstream's create_lmdb_iterative writes when its last file was a
        # duplicate prompt (§9.8).
        raise LMDBFormatError(f"{where}: key '{name}' holds {raw[:64]!r}, not 'N d1 d2 ...'")
    return dims


def _to_fp16(latent: ArrayLike) -> np.ndarray:
    if isinstance(latent, torch.Tensor):
        return latent.detach().to(device="cpu", dtype=torch.float16).contiguous().numpy()
    return np.ascontiguousarray(latent, dtype=ROW_DTYPE)


def _is_env_dir(path: Path) -> bool:
    return (path / "data.mdb").is_file()


def _natural_key(path: Path) -> list[int | str]:
    # shard_2 before shard_10
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", path.name)]


def find_envs(path: str | os.PathLike) -> list[Path]:
    """The LMDB environments making up the dataset at ``path``: itself, or its shard subdirectories."""
    root = Path(path)
    if not root.exists():
        raise LMDBFormatError(f"{root}: no such LMDB dataset")
    if _is_env_dir(root):
        return [root]
    shards = sorted((p for p in root.iterdir() if p.is_dir() and _is_env_dir(p)), key=_natural_key)
    if not shards:
        raise LMDBFormatError(f"{root}: neither an LMDB environment (no data.mdb) nor a directory of shards")
    return shards


def _open_readonly(path: Path) -> lmdb.Environment:
    try:
        return lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False, subdir=True)
    except lmdb.Error as err:
        raise LMDBFormatError(f"{path / 'data.mdb'}: cannot open LMDB environment ({err})") from err


# py-lmdb refuses to open one environment twice in a process, so readers of the same path share one
# read-only handle, closed when the last of them lets go. Keyed by pid: a forked child opens its own.
_SHARED_ENVS: dict[tuple[int, str], list] = {}


def _acquire_readonly(path: Path) -> lmdb.Environment:
    key = (os.getpid(), str(path.resolve()))
    entry = _SHARED_ENVS.get(key)
    if entry is None:
        entry = _SHARED_ENVS[key] = [_open_readonly(path), 0]
    entry[1] += 1
    return entry[0]


def _release_readonly(path: Path) -> None:
    key = (os.getpid(), str(path.resolve()))
    entry = _SHARED_ENVS.get(key)
    if entry is not None:
        entry[1] -= 1
        if entry[1] == 0:
            entry[0].close()
            del _SHARED_ENVS[key]


def _check_not_truncated(env: lmdb.Environment, path: Path) -> None:
    """Raise if data.mdb is shorter than the pages its meta page says are in use.

    LMDB reads through a memory map: touching a page past the end of a truncated file (an
    interrupted copy, a full disk) kills the process with SIGBUS instead of raising. The meta page
    is read with a plain read when the environment opens, so this check itself is safe.
    """
    mdb = path / "data.mdb"
    try:
        needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    except lmdb.Error as err:
        raise LMDBFormatError(f"{mdb}: corrupt LMDB environment ({err})") from err
    size = mdb.stat().st_size
    if size < needed:
        raise LMDBFormatError(
            f"{mdb} is truncated: {size} bytes, but its pages in use need {needed} "
            "(an interrupted copy or a full disk?); copy or rebuild the dataset"
        )


class _Shard:
    """One read-only environment: its committed row count and row shape."""

    def __init__(self, path: Path) -> None:
        self.path = path
        env = _acquire_readonly(path)
        try:
            _check_not_truncated(env, path)
            with env.begin() as txn:
                latents_raw = txn.get(LATENTS_SHAPE_KEY)
                prompts_raw = txn.get(PROMPTS_SHAPE_KEY)
            entries = env.stat()["entries"]
        except lmdb.Error as err:
            raise LMDBFormatError(f"{path}: corrupt LMDB environment ({err})") from err
        finally:
            _release_readonly(path)
        if latents_raw is None and prompts_raw is None and entries == 0:
            # A rank that had no work (or crashed before its first commit) leaves an empty shard.
            self.count, self.row_shape = 0, None
            return
        latents_shape = _parse_shape(latents_raw, LATENTS_SHAPE_KEY, path)
        prompts_shape = _parse_shape(prompts_raw, PROMPTS_SHAPE_KEY, path)
        if prompts_shape[0] != latents_shape[0]:
            raise LMDBFormatError(
                f"{path}: 'latents_shape' counts {latents_shape[0]} rows but 'prompts_shape' {prompts_shape[0]}"
            )
        self.count, self.row_shape = latents_shape[0], latents_shape[1:]
        if not self.row_shape:
            raise LMDBFormatError(f"{path}: 'latents_shape' holds a row count but no row shape")


class LMDBReader:
    """Read-only view of an LMDB dataset (one environment or a directory of shards) as one row list.

    Environments are opened lazily and re-opened in a forked child (an LMDB handle must not cross a
    fork), so the reader can be handed to DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._shards = [_Shard(p) for p in find_envs(self.path)]
        shapes = {s.row_shape for s in self._shards if s.row_shape is not None}
        if len(shapes) > 1:
            detail = ", ".join(f"{s.path.name}: {s.row_shape}" for s in self._shards if s.row_shape)
            raise LMDBFormatError(f"{self.path}: shards hold rows of different shapes ({detail})")
        self.row_shape: tuple[int, ...] | None = shapes.pop() if shapes else None
        self._starts = [0]
        for s in self._shards:
            self._starts.append(self._starts[-1] + s.count)
        self._envs: list[lmdb.Environment | None] = [None] * len(self._shards)
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def row_nbytes(self) -> int:
        return math.prod(self.row_shape or ()) * np.dtype(ROW_DTYPE).itemsize

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: row {index} out of range (dataset has {len(self)} rows)")
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def _env(self, shard: int) -> lmdb.Environment:
        if self._pid != os.getpid():
            # handles inherited over a fork belong to the parent: leave them, open our own
            self._envs = [None] * len(self._shards)
            self._pid = os.getpid()
        env = self._envs[shard]
        if env is None:
            env = self._envs[shard] = _acquire_readonly(self._shards[shard].path)
        return env

    def _get(self, shard: int, key: bytes) -> bytes | None:
        try:
            with self._env(shard).begin() as txn:
                return txn.get(key)
        except lmdb.Error as err:
            raise LMDBFormatError(f"{self._shards[shard].path}: corrupt LMDB environment ({err})") from err

    def _require(self, shard: int, key: bytes) -> bytes:
        raw = self._get(shard, key)
        if raw is None:
            raise LMDBFormatError(f"{self._shards[shard].path}: missing key '{key.decode()}'")
        return raw

    def latent(self, index: int) -> np.ndarray:
        """Row ``index`` as a float16 array of shape ``row_shape`` (a private, writable copy)."""
        shard, local = self._locate(index)
        key = latent_key(local)
        raw = self._require(shard, key)
        if len(raw) != self.row_nbytes:
            raise LMDBFormatError(
                f"{self._shards[shard].path}: key '{key.decode()}' holds {len(raw)} bytes, expected "
                f"{self.row_nbytes} (float16 row of shape {self.row_shape}); truncated or wrong dtype"
            )
        return np.frombuffer(raw, dtype=ROW_DTYPE).reshape(self.row_shape).copy()

    def prompt(self, index: int) -> str:
        shard, local = self._locate(index)
        key = prompt_key(local)
        raw = self._require(shard, key)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise LMDBFormatError(f"{self._shards[shard].path}: key '{key.decode()}' is not UTF-8") from err

    def key(self, index: int) -> str:
        """The job key of row ``index``: its stored ``keys_{i}_data`` if any, else its prompt."""
        shard, local = self._locate(index)
        raw = self._get(shard, job_key(local))
        return raw.decode("utf-8") if raw is not None else self.prompt(index)

    def close(self) -> None:
        if self._pid == os.getpid():
            for shard, env in zip(self._shards, self._envs):
                if env is not None:
                    _release_readonly(shard.path)
        self._envs = [None] * len(self._shards)

    def __del__(self) -> None:
        # best effort: a half-built reader or interpreter shutdown must not raise here
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_envs"] = [None] * len(self._shards)
        return state


def read_done_keys(path: str | os.PathLike) -> set[str]:
    """Job keys of every committed row under ``path`` (empty if nothing was written there yet).

    A restarted distributed job calls this on its output root, so work finished by *any* rank of the
    previous run is skipped even if the world size changed. Readers open without locks, so call it
    before any rank opens its writer (read, barrier, then write), never while another process writes.
    """
    root = Path(path)
    if not root.exists() or (not _is_env_dir(root) and not any(_is_env_dir(p) for p in root.iterdir())):
        return set()
    reader = LMDBReader(root)
    try:
        return {reader.key(i) for i in range(len(reader))}
    finally:
        reader.close()


class LMDBWriter:
    """Appends ``(prompt, latent)`` rows to one LMDB environment in upstream's layout.

    ``append=False`` refuses a path that already holds rows; ``append=True`` resumes after the last
    committed row and requires the same row shape. ``row_shape`` may be given up front (checked against
    existing data) or is fixed by the first row written. Use one writer per rank on
    ``shard_path(out, rank)``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        append: bool = False,
        row_shape: Sequence[int] | None = None,
        map_size: int = DEFAULT_MAP_SIZE,
    ) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise LMDBFormatError(f"{self.path}: exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._env = lmdb.open(str(self.path), map_size=map_size, subdir=True, meminit=False)
        except lmdb.Error as err:
            raise LMDBFormatError(
                f"{self.path}: cannot open LMDB environment for writing ({err}); close readers of this "
                "path in this process first"
            ) from err
        self.row_shape: tuple[int, ...] | None = tuple(row_shape) if row_shape is not None else None
        self._count = 0
        self._done: set[str] = set()
        try:
            self._load_existing(append)
        except Exception:
            self._env.close()
            raise

    def _load_existing(self, append: bool) -> None:
        with self._env.begin() as txn:
            raw = txn.get(LATENTS_SHAPE_KEY)
            if raw is None:
                if self._env.stat()["entries"]:
                    raise LMDBFormatError(
                        f"{self.path}: holds entries but no 'latents_shape' key; not a dataset we can "
                        "append to (upstream writes an empty shape key when its last file is a duplicate)"
                    )
                return
            existing = _parse_shape(raw, LATENTS_SHAPE_KEY, self.path)
            count, shape = existing[0], existing[1:]
            if not append and count:
                raise LMDBFormatError(
                    f"{self.path}: already holds {count} rows of shape {shape}; pass append=True to add "
                    "to it, or write to a new path"
                )
            if self.row_shape is not None and shape != self.row_shape:
                raise LMDBFormatError(
                    f"{self.path}: holds rows of shape {shape}, cannot append rows of shape {self.row_shape}"
                )
            self.row_shape, self._count = shape, count
            for i in range(count):
                key = txn.get(job_key(i)) or txn.get(prompt_key(i))
                if key is None:
                    raise LMDBFormatError(f"{self.path}: missing key '{prompt_key(i).decode()}'")
                self._done.add(key.decode("utf-8"))
        if self._count:
            logger.info("%s: resuming after %d existing rows of shape %s", self.path, count, shape)

    def __len__(self) -> int:
        return self._count

    def contains(self, key: str) -> bool:
        """Whether a row with this job key (the prompt, unless written with ``keys=``) is committed."""
        return key in self._done

    def done_keys(self) -> set[str]:
        return set(self._done)

    def write(self, prompt: str, latent: ArrayLike, key: str | None = None) -> int:
        """Commit one row (``latent`` of shape ``row_shape``, any float dtype); returns its index."""
        self.write_many([prompt], [latent], None if key is None else [key])
        return self._count - 1

    def write_many(
        self,
        prompts: Sequence[str],
        latents: ArrayLike | Sequence[ArrayLike],
        keys: Sequence[str] | None = None,
    ) -> None:
        """Commit a batch of rows atomically: ``latents`` is ``[B, *row_shape]`` or a list of B rows."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not one string")
        keys = list(prompts) if keys is None else list(keys)
        if not len(prompts) == len(latents) == len(keys):
            raise LMDBFormatError(
                f"{self.path}: {len(prompts)} prompts, {len(latents)} latents and {len(keys)} keys differ"
            )
        rows = []
        for prompt, latent in zip(prompts, latents):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be str, got {type(prompt).__name__}")
            row = _to_fp16(latent)
            if self.row_shape is None:
                self.row_shape = tuple(row.shape)
            if tuple(row.shape) != self.row_shape:
                raise LMDBFormatError(
                    f"{self.path}: row for prompt {prompt[:60]!r} has shape {tuple(row.shape)}, the dataset "
                    f"holds rows of shape {self.row_shape}"
                )
            if not np.isfinite(row).all():
                raise LMDBFormatError(
                    f"{self.path}: row for prompt {prompt[:60]!r} has non-finite values in float16"
                )
            rows.append((prompt.encode("utf-8"), row.tobytes()))
        if rows:
            self._commit(rows, keys, prompts)

    def _commit(self, rows: list[tuple[bytes, bytes]], keys: list[str], prompts: Sequence[str]) -> None:
        new_count = self._count + len(rows)
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for j, (prompt_bytes, row_bytes) in enumerate(rows):
                        i = self._count + j
                        txn.put(latent_key(i), row_bytes)
                        txn.put(prompt_key(i), prompt_bytes)
                        if keys[j] != prompts[j]:
                            txn.put(job_key(i), keys[j].encode("utf-8"))
                        else:
                            # an index past the old count may hold leftovers of someone else's write
                            txn.delete(job_key(i))
                    # The count goes in the same transaction as the rows: both or neither are visible.
                    txn.put(LATENTS_SHAPE_KEY, _format_shape(new_count, self.row_shape))
                    txn.put(PROMPTS_SHAPE_KEY, _format_shape(new_count, ()))
                break
            except lmdb.MapFullError:
                # The aborted transaction left nothing behind; reserve more address space and retry.
                self._env.set_mapsize(self._env.info()["map_size"] * 2)
        self._count = new_count
        self._done.update(keys)

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> LMDBWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
