"""Resumable checkpoints with torch.distributed.checkpoint (DCP), plus export to upstream's `.pt`.

Layout: `<run_dir>/checkpoints/step_{step:08d}/` holding DCP shards and a `COMPLETE` marker.
A save writes into `.tmp_step_{step:08d}/`, renames it into place and writes `COMPLETE` last, so a
save killed at any point leaves the previous checkpoint intact and `load_latest` only ever sees
complete ones. Model and optimizer state are sharded state dicts (DTensors), so DCP reshards them
when resuming at a different world size.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from utils.distributed import barrier, broadcast_object, reshard_all

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
RNG_KEY = "rng"  # reserved key: the Checkpointer adds every rank's RNG state under it
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp_"
# Upstream checkpoints are `{"generator", "critic", "generator_ema"}` of the wrapper's `model.*` keys.
UPSTREAM_PREFIX = "model."


class NonFiniteCheckpointError(RuntimeError):
    """Raised instead of writing a checkpoint that holds NaN or inf."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


# ------------------------------------------------------------------------------------------------
# Stateful wrappers
# ------------------------------------------------------------------------------------------------


class ModelState(Stateful):
    """A (possibly FSDP2-sharded) module and its optimizer as one DCP entry, keyed by parameter FQN."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        reshard_all(self.model)  # the sharded parameters are the ones to save and load into
        state = {"model": get_model_state_dict(self.model)}
        if self.optimizer is not None:
            state["optim"] = get_optimizer_state_dict(self.model, self.optimizer)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        reshard_all(self.model)
        set_model_state_dict(self.model, state_dict["model"])
        if self.optimizer is not None:
            set_optimizer_state_dict(self.model, self.optimizer, state_dict["optim"])


class OptimizerState(Stateful):
    """An extra optimizer over (some of) a module's parameters, saved without the module's weights."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        reshard_all(self.model)
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        reshard_all(self.model)
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


def _capture_rng() -> bytes:
    accel = None
    if torch.cuda.is_available():  # accelerator RNG of the current device, when there is one
        accel = torch.cuda.get_rng_state().numpy().tobytes()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
        "torch": torch.get_rng_state().numpy().tobytes(),
        "cuda": accel,
    }
    return pickle.dumps(state)


def _restore_rng(blob: bytes) -> None:
    state = pickle.loads(blob)  # written by _capture_rng into our own checkpoint
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(state["torch"]), dtype=torch.uint8))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(state["cuda"]), dtype=torch.uint8))


def _reseed_from(blob: bytes, rank: int) -> None:
    """Deterministic per-rank seed derived from a saved RNG state (used when the world size changed)."""
    import hashlib

    digest = hashlib.sha256(blob + rank.to_bytes(8, "little")).digest()
    seed = int.from_bytes(digest[:8], "little") % 2**63
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RNGState(Stateful):
    """Python, numpy, torch CPU and CUDA generator states of **every** rank.

    Saving gathers each rank's state into one rank-indexed list (identical on all ranks, so DCP
    writes it once). Loading at the same world size restores each rank's own state exactly. At a
    different world size the old streams cannot be mapped onto the new ranks, so every rank reseeds
    all generators from `sha256(saved rank-0 state, new rank)`: deterministic for a given checkpoint
    and world size, and different on every rank.
    """

    def state_dict(self) -> dict[str, Any]:
        mine = _capture_rng()
        states = [mine]
        if _world_size() > 1:
            states = [b""] * _world_size()
            dist.all_gather_object(states, mine)
        # One opaque blob, so that loading at another world size meets no per-rank key mismatch.
        return {"world_size": _world_size(), "states": pickle.dumps(states)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = pickle.loads(state_dict["states"])
        if int(state_dict["world_size"]) == _world_size() and len(states) == _world_size():
            _restore_rng(states[_rank()])
        else:
            logger.warning(
                "checkpoint was written by %d ranks, resuming on %d: RNG streams reseeded deterministically",
                state_dict["world_size"],
                _world_size(),
            )
            _reseed_from(states[0], _rank())


# ------------------------------------------------------------------------------------------------
# Checkpointer
# ------------------------------------------------------------------------------------------------


class Checkpointer:
    """Save/load everything that changes during training, atomically, keeping the newest `keep_last`.

    `state` maps names to `Stateful` objects (`ModelState`, `EMA`, LR schedulers, data samplers) or
    plain dicts of tensors/python values. Python values must be identical on every rank (DCP keeps
    one copy); per-rank RNG is handled here. Every rank calls `save`/`load_latest` (they are
    collective); all ranks must see the same file system.
    """

    def __init__(self, run_dir: str | Path, keep_last: int = 3, save_rng: bool = True) -> None:
        if keep_last < 0:
            raise ValueError(f"keep_last must be >= 0 (0 keeps every checkpoint), got {keep_last}")
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.save_rng = save_rng

    # -- paths -----------------------------------------------------------------------------------

    def path_for(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and child.is_dir() and (child / COMPLETE_MARKER).is_file():
                found.append((int(match.group(1)), child))
        return sorted(found)

    def latest(self) -> tuple[int, Path] | None:
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    # -- save ------------------------------------------------------------------------------------

    def save(self, step: int, state: Mapping[str, Stateful | dict[str, Any]]) -> Path:
        """Write `state` as checkpoint `step` (collective). Refuses non-finite tensors."""
        if RNG_KEY in state and self.save_rng:
            raise ValueError(f"state key {RNG_KEY!r} is reserved for the Checkpointer's RNG state")
        plain: dict[str, Any] = {
            k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state.items()
        }
        _refuse_non_finite(plain, step)
        if self.save_rng:
            plain[RNG_KEY] = RNGState().state_dict()

        final, tmp = self.path_for(step), self.root / f"{_TMP_PREFIX}{self.path_for(step).name}"
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        started = time.perf_counter()
        dcp.save(plain, checkpoint_id=str(tmp))
        barrier()
        if _rank() == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_marker(final, {"step": step, "world_size": _world_size(), "time": time.time()})
            self._prune()
            logger.info("saved checkpoint %s in %.1fs", final, time.perf_counter() - started)
        barrier()
        return final

    def _prune(self) -> None:
        """Rank 0: drop leftovers of interrupted saves and all but the newest `keep_last` checkpoints."""
        for child in self.root.iterdir():
            match = _STEP_DIR.match(child.name)
            interrupted = child.name.startswith(_TMP_PREFIX) or (
                match and not (child / COMPLETE_MARKER).exists()
            )
            if interrupted and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
        if self.keep_last:
            for _, old in self.complete_checkpoints()[: -self.keep_last]:
                # Remove the marker first so a half-deleted directory never looks complete.
                (old / COMPLETE_MARKER).unlink(missing_ok=True)
                shutil.rmtree(old, ignore_errors=True)

    # -- load ------------------------------------------------------------------------------------

    def load_latest(self, state: Mapping[str, Stateful | dict[str, Any]]) -> int | None:
        """Load the newest complete checkpoint into `state` in place; return its step, or None if none."""
        found = broadcast_object(self.latest() if _rank() == 0 else None)  # rank 0's view decides
        if found is None:
            return None
        step, path = found
        self.load(path, state)
        return step

    def load(self, path: str | Path, state: Mapping[str, Stateful | dict[str, Any]]) -> None:
        """Load checkpoint directory `path` into `state` (collective); restores RNG last."""
        path = Path(path)
        if not (path / COMPLETE_MARKER).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
        to_load: dict[str, Any] = dict(state)
        if self.save_rng:
            to_load[RNG_KEY] = RNGState()  # last, so it is restored after everything else
        dcp.load(to_load, checkpoint_id=str(path))
        logger.info("loaded checkpoint %s", path)


def _write_marker(directory: Path, info: dict[str, Any]) -> None:
    tmp = directory / f"{COMPLETE_MARKER}.partial"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / COMPLETE_MARKER)


def _iter_tensors(obj: Any, prefix: str = ""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _iter_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _iter_tensors(value, f"{prefix}.{i}")


def _refuse_non_finite(state: Mapping[str, Any], step: int) -> None:
    """Raise on every rank if any rank holds a NaN/inf floating tensor (names the offending keys)."""
    bad = []
    for name, tensor in _iter_tensors(state):
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if (local.is_floating_point() or local.is_complex()) and not bool(torch.isfinite(local).all()):
            bad.append(name)
    all_bad = [bad]
    if _world_size() > 1:
        all_bad = [None] * _world_size()
        dist.all_gather_object(all_bad, bad)
    offenders = sorted({name for rank_bad in all_bad for name in rank_bad})
    if offenders:
        raise NonFiniteCheckpointError(
            f"refusing to save checkpoint at step {step}: non-finite values in {offenders[:10]}"
            + (f" and {len(offenders) - 10} more" if len(offenders) > 10 else "")
        )


# ------------------------------------------------------------------------------------------------
# Upstream export
# ------------------------------------------------------------------------------------------------


def gather_full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full state dict on CPU on rank 0 (empty dict on other ranks). Collective."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# A GAN critic's discriminator head sits beside the DiT on the wrapper, as in upstream's
# `WanDiffusionWrapper.adding_cls_branch` (spec §1.10), so its keys carry no `model.` prefix.
GAN_HEAD_PREFIXES = ("_register_tokens.", "_gan_ca_blocks.", "_cls_pred_branch.")


def export_upstream_pt(
    path: str | Path,
    generator_sd: Mapping[str, torch.Tensor],
    critic_sd: Mapping[str, torch.Tensor] | None = None,
    ema_sd: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write upstream Self-Forcing's `.pt`: `{"generator", "critic", "generator_ema"}` (rank 0 only).

    Each state dict must already use the wrapper's `model.`-prefixed Wan keys (conversion lives in
    `wan/weights.py`) and hold full tensors; floating tensors are stored as fp32 on the CPU. Missing
    entries (`critic_sd`/`ema_sd` None) are left out, as upstream does for EMA before it starts.
    """
    payload: dict[str, dict[str, torch.Tensor]] = {}
    for name, sd in (("generator", generator_sd), ("critic", critic_sd), ("generator_ema", ema_sd)):
        if sd is None:
            continue
        out = {}
        for key, tensor in sd.items():
            if not key.startswith(UPSTREAM_PREFIX) and not (
                name == "critic" and key.startswith(GAN_HEAD_PREFIXES)
            ):
                raise ValueError(
                    f"{name} key {key!r} lacks the {UPSTREAM_PREFIX!r} prefix of upstream checkpoints"
                )
            if isinstance(tensor, DTensor):
                raise ValueError(
                    f"{name} key {key!r} is a sharded DTensor; gather it first (gather_full_state_dict)"
                )
            tensor = tensor.detach().cpu()
            out[key] = tensor.float() if tensor.is_floating_point() else tensor
        payload[name] = out
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------
# Reading one model out of a run (inference, export) without a process group
# ------------------------------------------------------------------------------------------------

# Where each model lives inside our checkpoints: trainer state key -> prefix of its tensors.
RUN_ENTRIES = {"generator": "generator.model.", "critic": "critic.model.", "ema": "ema."}


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A run directory (its newest complete checkpoint) or one checkpoint directory."""
    path = Path(path)
    if (path / COMPLETE_MARKER).is_file():
        return path
    latest = Checkpointer(path).latest()
    if latest is None:
        raise FileNotFoundError(f"{path} holds no complete checkpoint (looked in {path / 'checkpoints'})")
    return latest[1]


def run_ema_entries(path: str | Path) -> dict[float, str]:
    """EMA rate -> checkpoint entry (`ema`, or `ema_<rate>` for runs with several rates) of a run.

    The rate of a single `ema` entry comes from the run's `config.yaml` when it is there (else NaN)."""
    ckpt = resolve_checkpoint_dir(path)
    metadata = dcp.FileSystemReader(str(ckpt)).read_metadata()
    # The flattened keys join path parts with "." (as in "ema_0.99.model..."): read the parts instead.
    paths = metadata.planner_data or {}
    tops = {paths[k][0] if k in paths else k.split(".", 1)[0] for k in metadata.state_dict_metadata}
    found: dict[float, str] = {}
    for top in tops:
        if top.startswith("ema_"):
            found[float(top[len("ema_") :])] = top
    if "ema" in tops:
        rate = float("nan")
        config = ckpt.parent.parent / "config.yaml"
        if config.is_file():
            from omegaconf import OmegaConf

            value = OmegaConf.load(config).get("ema_weight")
            rate = float(value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value)
        found[rate] = "ema"
    return found


def select_ema_entry(path: str | Path, rate: float | None = None) -> str:
    """The checkpoint entry of the EMA at `rate` (None: the run's only EMA); errors list the rates kept."""
    entries = run_ema_entries(path)
    rates = sorted(r for r in entries if r == r)
    if not entries:
        raise KeyError(f"{path} holds no EMA weights (ema_weight 0, or before ema_start_step)")
    if rate is None:
        if len(entries) > 1:
            raise ValueError(f"{path} keeps EMAs at rates {rates}; choose one (e.g. --use_ema {rates[-1]})")
        return next(iter(entries.values()))
    for r, name in entries.items():
        if r == rate or (r != r and len(entries) == 1):  # NaN: a single EMA whose rate is unrecorded
            return name
    raise ValueError(f"{path} has no EMA at rate {rate}; it keeps {rates}")


def read_run_model(path: str | Path, entry: str = "generator") -> dict[str, torch.Tensor]:
    """Full (unsharded) weights of `entry` ("generator", "critic", "ema" or "ema_<rate>") from one of
    our DCP checkpoints, with the wrapper's keys (`model.<wan key>`, plus GAN-head keys for a GAN critic).
    LoRA runs hold `...base_layer.weight` and `...lora_A/B.default.weight` keys (`utils.lora`), and
    their EMA entries the adapters only.

    Reads only that entry's tensors (not the optimizers), in one process, at any world size.
    """
    if entry not in RUN_ENTRIES and not entry.startswith("ema_"):
        raise ValueError(f"entry must be one of {sorted(RUN_ENTRIES)} or ema_<rate>, got {entry!r}")
    ckpt = resolve_checkpoint_dir(path)
    prefix = RUN_ENTRIES.get(entry, entry + ".")
    names = {
        k for k in dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata if k.startswith(prefix)
    }
    if not names:
        raise KeyError(f"{ckpt} has no {entry!r} weights (EMA starts at ema_start_step)")
    nested = _load_single_process(names, ckpt)
    for part in [entry] if entry not in RUN_ENTRIES else prefix.rstrip(".").split("."):
        nested = nested[part]
    return {k: v for k, v in nested.items() if isinstance(v, torch.Tensor)}


def read_run_counters(path: str | Path) -> dict[str, Any]:
    """The trainer's counters (`step`, `nan_skips`, `ema_active`) of a run's checkpoint."""
    ckpt = resolve_checkpoint_dir(path)
    names = {
        k
        for k in dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
        if k.startswith("trainer.")
    }
    return dict(_load_single_process(names, ckpt).get("trainer", {}))


def _load_single_process(names: set[str], ckpt: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():
        # "assuming the intent is to load in a single process": exactly the intent here.
        warnings.filterwarnings("ignore", message="torch.distributed is unavailable or uninitialized")
        return _load_state_dict_from_keys(names, checkpoint_id=str(ckpt))
