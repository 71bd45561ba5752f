"""Resumable checkpoints with torch.distributed.checkpoint (DCP), plus export to upstream's `.pt`.

Layout: `<run_dir>/checkpoints/step_{step:08d}/` holding DCP shards and a `COMPLETE` marker.
A save writes into `.tmp_step_{step:08d}/`, renames it into place and writes `COMPLETE` last, so a
save killed at any point leaves the previous checkpoint intact and `load_latest` only ever sees
complete ones. Model and optimizer state are sharded state dicts (DTensors), so DCP reshards them
when resuming at a different world size.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
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
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from utils.distributed import barrier, broadcast_object, reshard_all
from utils.errors import UserError

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
RNG_KEY = "rng"  # reserved key: the Checkpointer adds every rank's RNG state under it
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp_"
# Upstream checkpoints are `{"generator", "critic", "generator_ema"}` of the wrapper's `model.*` keys.
UPSTREAM_PREFIX = "model."


class NonFiniteCheckpointError(RuntimeError):
    """Raised instead of writing a checkpoint that holds NaN or inf."""


class CheckpointError(UserError):
    """A checkpoint cannot be used by this run (incomplete, another format, other parameters)."""


class CheckpointChoiceError(CheckpointError, ValueError):
    """What was asked of a run directory is not in it: no complete checkpoint, no EMA at that rate."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


# ------------------------------------------------------------------------------------------------
# Stateful wrappers
# ------------------------------------------------------------------------------------------------


def _param_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its FQN, without wrapper prefixes (torch.compile, checkpoint wrappers)."""
    names = {}
    for name, param in model.named_parameters():
        for wrapper in ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module."):
            name = name.replace(wrapper, "")
        names[id(param)] = name
    return names


def optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer`'s state keyed by parameter FQN: `{"state": {fqn: {...}}, "param_groups": [...]}`.

    Unlike `get_optimizer_state_dict`, this never initialises missing state (torch does that with
    a zero-gradient `step()`, which sets Adam's step counters to 1 and so changes the next update):
    parameters that have not stepped yet simply have no entry, as in the live optimizer. Tensors are
    the optimizer's own (DTensor shards for FSDP2 parameters), not copies.
    """
    names = _param_names(model)
    state: dict[str, dict[str, Any]] = {}
    groups = []
    for group in optimizer.param_groups:
        fqns = [names[id(p)] for p in group["params"]]
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": fqns})
        for p, fqn in zip(group["params"], fqns):
            if optimizer.state.get(p):
                state[fqn] = dict(optimizer.state[p])
    return {"state": state, "param_groups": groups}


def _optimizer_template(
    model: nn.Module, optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]
) -> dict[str, Any]:
    """What to load into: the param groups, and state tensors for exactly the (FQN, name) entries
    `saved` (checkpoint key suffix -> storage metadata) holds, shaped and placed like the parameters."""
    template = optimizer_state_dict(model, optimizer)
    params = {fqn: p for p, fqn in _named_params(model, optimizer)}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for suffix, meta in saved.items():
        fqn, _, name = suffix.rpartition(".")
        if fqn not in params:
            raise CheckpointError(
                f"checkpoint holds optimizer state for {fqn!r}, which this model does not train"
            )
        p, size, dtype = params[fqn], tuple(meta.size), meta.properties.dtype
        if name != "step" and size == tuple(p.shape):
            state.setdefault(fqn, {})[name] = torch.zeros_like(p, dtype=dtype)  # DTensor like p
        else:  # Adam's step counter (a CPU scalar) and any other unsharded value
            state.setdefault(fqn, {})[name] = torch.zeros(size, dtype=dtype)
    template["state"] = state
    return template


def _named_params(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[nn.Parameter, str]]:
    names = _param_names(model)
    return [(p, names[id(p)]) for group in optimizer.param_groups for p in group["params"]]


def load_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]
) -> None:
    """Inverse of `optimizer_state_dict`. Parameters without an entry keep no state (they have not
    stepped, and will initialise it lazily on their first step, as in an uninterrupted run)."""
    named = _named_params(model, optimizer)
    index = {fqn: i for i, (_, fqn) in enumerate(named)}
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"checkpoint optimizer has {len(saved_groups)} parameter groups, this one "
            f"{len(optimizer.param_groups)}: the run's trainable parameters changed"
        )
    groups, position = [], 0
    for saved, live in zip(saved_groups, optimizer.param_groups):
        live_fqns = [fqn for _, fqn in named[position : position + len(live["params"])]]
        if list(saved["params"]) != live_fqns:
            missing = sorted(set(live_fqns) ^ set(saved["params"]))[:5]
            raise CheckpointError(
                f"checkpoint optimizer group trains other parameters than this run ({missing} ...)"
            )
        groups.append({**saved, "params": [index[f] for f in live_fqns]})
        position += len(live["params"])
    state = {index[fqn]: dict(values) for fqn, values in state_dict["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": groups})


class ModelState(Stateful):
    """A (possibly FSDP2-sharded) module and its optimizer as one DCP entry, keyed by parameter FQN.

    Before a load, `Checkpointer.load` calls `prepare_load` with the entry's optimizer keys in the
    checkpoint, so the template asks only for the optimizer state that was saved.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self._saved_optim: dict[str, Any] | None = None

    def prepare_load(self, keys: Mapping[str, Any]) -> None:
        """`keys`: checkpoint key (without this entry's name) -> DCP storage metadata."""
        prefix = "optim.state."
        self._saved_optim = {k[len(prefix) :]: m for k, m in keys.items() if k.startswith(prefix)}

    def state_dict(self) -> dict[str, Any]:
        reshard_all(self.model)  # the sharded parameters are the ones to save and load into
        state = {"model": get_model_state_dict(self.model)}
        if self.optimizer is not None:
            if self._saved_optim is None:
                state["optim"] = optimizer_state_dict(self.model, self.optimizer)
            else:
                state["optim"] = _optimizer_template(self.model, self.optimizer, self._saved_optim)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved_optim = None
        reshard_all(self.model)
        set_model_state_dict(self.model, state_dict["model"])
        if self.optimizer is not None:
            load_optimizer_state_dict(self.model, self.optimizer, state_dict["optim"])


class OptimizerState(Stateful):
    """An extra optimizer over (some of) a module's parameters, saved without the module's weights."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer
        self._saved: dict[str, Any] | None = None

    def prepare_load(self, keys: Mapping[str, Any]) -> None:
        self._saved = {k[len("state.") :]: m for k, m in keys.items() if k.startswith("state.")}

    def state_dict(self) -> dict[str, Any]:
        reshard_all(self.model)
        if self._saved is not None:
            return _optimizer_template(self.model, self.optimizer, self._saved)
        return optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = None
        reshard_all(self.model)
        load_optimizer_state_dict(self.model, self.optimizer, state_dict)


class ScalarState(Stateful):
    """A Stateful whose state is a flat dict of ints, floats and bools (counters, a sampler's
    position), stored as 0-d tensors so that no pickled value of ours ends up in a checkpoint."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in self.inner.state_dict().items():
            if isinstance(value, bool):
                out[key] = torch.tensor(value, dtype=torch.bool)
            elif isinstance(value, int):
                out[key] = torch.tensor(value, dtype=torch.int64)
            elif isinstance(value, float):
                out[key] = torch.tensor(value, dtype=torch.float64)
            else:
                raise TypeError(f"ScalarState: {key!r} is a {type(value).__name__}, not int/float/bool")
        return out

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.inner.load_state_dict({k: v.item() for k, v in state_dict.items()})


class SchedulerState(Stateful):
    """An LR scheduler's place in a checkpoint: its step counter and rates, without its multipliers'
    fields (`LambdaLR.state_dict` carries a callable's `__dict__`, e.g. `WarmupDecay`'s). Every start
    rebuilds those from the run's config (recipe.resume.restore_latest), so the checkpoint need not
    hold them, and one written before a field existed (`decay_start`) still loads."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        state = self.scheduler.state_dict()
        del state["lr_lambdas"]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # None: LambdaLR leaves that multiplier as this run built it.
        self.scheduler.load_state_dict({**state_dict, "lr_lambdas": [None] * len(self.scheduler.lr_lambdas)})


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _capture_rng() -> dict[str, Any]:
    """This process's generator states as JSON values (byte states base64-encoded)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state().numpy().tobytes()),
        "cuda": None,
    }
    if torch.cuda.is_available():  # accelerator RNG of the current device, when there is one
        state["cuda"] = _b64(torch.cuda.get_rng_state().numpy().tobytes())
    return state


def _bytes_tensor(blob: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(blob)), dtype=torch.uint8)


def _restore_rng(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_bytes_tensor(state["torch"]))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(_bytes_tensor(state["cuda"]))


def _reseed_from(state: Mapping[str, Any], rank: int) -> None:
    """Deterministic per-rank seed derived from a saved RNG state (used when the world size changed)."""
    import hashlib

    blob = json.dumps(state, sort_keys=True).encode()
    digest = hashlib.sha256(blob + rank.to_bytes(8, "little")).digest()
    seed = int.from_bytes(digest[:8], "little") % 2**63
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RNGState(Stateful):
    """Python, numpy, torch CPU and CUDA generator states of **every** rank.

    Saving gathers each rank's state into one rank-indexed list (identical on all ranks, so DCP
    writes it once), stored as the UTF-8 bytes of its JSON in a uint8 tensor: no pickle. Loading at
    the same world size restores each rank's own state exactly. At a different world size the old
    streams cannot be mapped onto the new ranks, so every rank reseeds all generators from
    `sha256(saved rank-0 state, new rank)`: deterministic for a given checkpoint and world size, and
    different on every rank.
    """

    def __init__(self) -> None:
        self._load_size: int | None = None

    def prepare_load(self, keys: Mapping[str, Any]) -> None:
        if "json" not in keys:
            raise CheckpointError(
                "checkpoint holds no RNG state in this project's format (rng.json); it was written "
                "by an older version"
            )
        self._load_size = int(keys["json"].size[0])

    def state_dict(self) -> dict[str, Any]:
        if self._load_size is not None:  # template for a load
            return {"json": torch.zeros(self._load_size, dtype=torch.uint8)}
        mine = _capture_rng()
        states = [mine]
        if _world_size() > 1:
            states = [None] * _world_size()
            dist.all_gather_object(states, mine)  # in memory only; nothing pickled reaches the disk
        blob = json.dumps({"world_size": _world_size(), "states": states}).encode("utf-8")
        return {"json": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_size = None
        saved = json.loads(bytes(state_dict["json"].numpy()).decode("utf-8"))
        states = saved["states"]
        if int(saved["world_size"]) == _world_size() and len(states) == _world_size():
            _restore_rng(states[_rank()])
        else:
            logger.warning(
                "checkpoint was written by %d ranks, resuming on %d: RNG streams reseeded deterministically",
                saved["world_size"],
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
            raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
        to_load: dict[str, Any] = dict(state)
        if self.save_rng:
            to_load[RNG_KEY] = RNGState()  # last, so it is restored after everything else
        _prepare_load(to_load, path)
        try:
            dcp.load(to_load, checkpoint_id=str(path))
        except CheckpointException as err:  # a BaseException, raised on every rank alike
            exc = next(iter(err.failures.values()))[0]
            raise CheckpointError(f"{path} cannot be loaded into this run: {exc}") from err
        except ValueError as err:  # a Stateful refusing its state (e.g. the sampler's dataset size)
            raise CheckpointError(f"{path} cannot be loaded into this run: {err}") from err
        logger.info("loaded checkpoint %s", path)


def _prepare_load(state: Mapping[str, Any], path: Path) -> None:
    """Tell each entry with a `prepare_load` hook which of its keys the checkpoint holds (with their
    storage metadata), so that its load template asks for exactly those, no more."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for name, obj in state.items():
        if hasattr(obj, "prepare_load"):
            prefix = f"{name}."
            obj.prepare_load({k[len(prefix) :]: m for k, m in saved.items() if k.startswith(prefix)})


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
        raise CheckpointChoiceError(
            f"{path} holds no complete checkpoint (looked in {path / 'checkpoints'}): pass a run "
            "directory or one of its checkpoints/step_XXXXXXXX"
        )
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
        raise CheckpointChoiceError(f"{path} holds no EMA weights (ema_weight 0, or before ema_start_step)")
    if rate is None:
        if len(entries) > 1:
            raise CheckpointChoiceError(
                f"{path} keeps EMAs at rates {rates}; choose one (e.g. --use_ema {rates[-1]})"
            )
        return next(iter(entries.values()))
    for r, name in entries.items():
        if r == rate or (r != r and len(entries) == 1):  # NaN: a single EMA whose rate is unrecorded
            return name
    raise CheckpointChoiceError(f"{path} has no EMA at rate {rate}; it keeps {rates}")


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
    if entry == "ema" or entry.startswith("ema_"):
        _require_active_ema(ckpt)
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


def _require_active_ema(ckpt: Path) -> None:
    """Before `ema_start_step` a run's EMA entry holds a placeholder (the initial weights), not an EMA."""
    counters = read_run_counters(ckpt)
    if counters.get("ema_active", True):
        return
    start: Any = "?"
    config = ckpt.parent.parent / "config.yaml"  # <run>/checkpoints/step_X -> <run>/config.yaml
    if config.is_file():
        import yaml

        start = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("ema_start_step", "?")
    raise CheckpointError(
        f"{ckpt} has no EMA weights yet: the run is at step {counters.get('step')} and its EMA starts at "
        f"ema_start_step={start}; use the generator's weights (no --use_ema) or a later checkpoint"
    )


def read_run_counters(path: str | Path) -> dict[str, Any]:
    """The trainer's counters (`step`, `nan_skips`, `ema_active`) of a run's checkpoint."""
    ckpt = resolve_checkpoint_dir(path)
    names = {
        k
        for k in dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
        if k.startswith("trainer.")
    }
    counters = _load_single_process(names, ckpt).get("trainer", {})
    return {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in counters.items()}


def _load_single_process(names: set[str], ckpt: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():
        # "assuming the intent is to load in a single process": exactly the intent here.
        warnings.filterwarnings("ignore", message="torch.distributed is unavailable or uninitialized")
        return _load_state_dict_from_keys(names, checkpoint_id=str(ckpt))
