"""Helpers shared by the offline data jobs (`generate_ode_pairs`, `encode_videos`).

* a cross-rank row count for the throughput line (logging goes through `utils.logging.setup_logging`);
* building the frozen teacher DiT and the prompt encoder from CLI arguments (paths live here, never in
  `wan/` or `pipeline/`);
* a job manifest (``<out>/job.json``) that records the settings a dataset was made with, so a restarted
  job resumes only into a dataset made the same way and refuses anything else unless told to append.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from utils.config import WAN_NEGATIVE_PROMPT  # noqa: F401 - re-exported for the scripts
from utils.lmdb import LMDBFormatError, LMDBReader, find_envs
from utils.scheduler import FlowMatchScheduler
from wan import WanConfig, WanDiffusionWrapper, WanModel
from wan.weights import load_dit_weights, read_dit_weights

logger = logging.getLogger(__name__)

MANIFEST_NAME = "job.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Spread of the random weights of a demo teacher: Wan zero-inits its head, so a freshly built model
# predicts v = 0; every parameter gets N(0, scale^2) (norm weights around 1) to make its output non-trivial.
RANDOM_WEIGHT_SCALE = 0.2

PromptEncoder = Callable[[list[str]], Tensor]


# 1. Runtime ------------------------------------------------------------------------------------------


def sum_over_ranks(value: int, device: torch.device) -> int:
    """Sum an integer over all ranks (identity without a multi-process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(box)
    return int(box.item())


# 2. Teacher ------------------------------------------------------------------------------------------


def model_preset(name: str) -> WanConfig:
    """`--model`: a WanConfig preset, or "world" (the shapes world's network, world/network.py)."""
    if name == "world":
        from world.network import NETWORK

        return NETWORK
    return WanConfig.preset(name)


def add_teacher_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("teacher")
    group.add_argument(
        "--model",
        default="wan2.1-t2v-1.3b",
        help="WanConfig preset: wan2.1-t2v-1.3b, wan2.1-t2v-14b, tiny; or world",
    )
    group.add_argument(
        "--weights",
        default=None,
        help="DiT weights: an official/diffusers safetensors file or folder, or a .pt state dict. May be "
        "omitted only with --model tiny, which then uses random weights drawn from --seed (CPU demos, tests); "
        "'toy' = the toy networks' teacher (the same weights train.py gives the tiny preset); "
        "'exact' = the shapes world's exact teacher (with --model world); 'exact-random-start' = the same "
        "for the world whose objects start anywhere along their path",
    )
    group.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="teacher dtype (upstream: float32)"
    )


def random_init_(module: nn.Module, seed: int, scale: float = RANDOM_WEIGHT_SCALE) -> nn.Module:
    """Overwrite every parameter with seeded Gaussian values (norm weights centred on 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            values = torch.randn(param.shape, generator=generator) * scale
            if "norm" in name and name.endswith("weight"):
                values += 1.0
            param.copy_(values)
    return module


def build_teacher(
    model: str, weights: str | None, seed: int, device: torch.device, dtype: torch.dtype
) -> WanDiffusionWrapper:
    """The frozen bidirectional teacher as a `WanDiffusionWrapper` in eval mode on ``device``."""
    # the shapes world's closed-form teacher (world/teacher.py), of the centre-start or random-start world
    if weights in ("exact", "exact-random-start"):
        if model != "world":
            raise ValueError(
                f"--weights exact is the shapes world's teacher; it needs --model world, not {model}"
            )
        from world.teacher import ExactTeacher
        from world.text import WorldTextEncoder

        cfg = model_preset(model)
        text = WorldTextEncoder(cfg.text_dim, cfg.text_len)
        return ExactTeacher(text, random_start=weights == "exact-random-start").to(device).eval()
    cfg = model_preset(model)
    if weights is None and cfg != WanConfig.preset("tiny"):
        raise ValueError(f"--weights is required for --model {model} (random weights only for --model tiny)")
    # Built straight on the target device: no CPU copy of a 14B model, and GPU init is quick.
    with torch.device(device):
        net = WanModel(cfg)
    if weights == "toy":
        from wan.toy import toy_dit_state_dict  # the toy networks' teacher, identical to train.py's

        load_dit_weights(net, toy_dit_state_dict(cfg))
    elif weights is not None:
        load_dit_weights(net, read_dit_weights(weights))
        logger.info("teacher %s: loaded %s", model, weights)
    else:
        random_init_(net, seed)
        logger.warning("teacher %s: random weights from seed %d (demo/test only)", model, seed)
    net.requires_grad_(False)
    # The wrapper's scheduler only converts flow to x0 (sigma = t/1000); its shift is irrelevant here.
    return WanDiffusionWrapper(net, FlowMatchScheduler()).to(device=device, dtype=dtype).eval()


# 3. Prompt encoder -----------------------------------------------------------------------------------


def add_text_encoder_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "text encoder (exactly one of --text_encoder / --hashed_text_embeddings)"
    )
    group.add_argument(
        "--text_encoder",
        default=None,
        help="a diffusers-format Wan folder (text_encoder/ + tokenizer/), Wan's original "
        "models_t5_umt5-xxl-enc-bf16.pth (then also --tokenizer), 'toy' (the toy networks' tiny umT5) "
        "or 'world' (the shapes world's word embeddings)",
    )
    group.add_argument(
        "--tokenizer", default=None, help="umT5 tokenizer folder, for an original .pth encoder"
    )
    group.add_argument(
        "--hashed_text_embeddings",
        action="store_true",
        help="no text encoder: each prompt's embedding is N(0, 1) noise [text_len, text_dim] seeded from "
        "the SHA-256 of its UTF-8 bytes (see hashed_prompt_embeds). For CPU demos with a random teacher",
    )


def hashed_prompt_embeds(prompts: list[str], text_len: int, text_dim: int) -> Tensor:
    """Deterministic stand-in embeddings ``[B, text_len, text_dim]`` (float32, CPU).

    Prompt ``p`` gets ``randn(text_len, text_dim)`` from a CPU generator seeded with the first 8 bytes
    (little-endian) of ``sha256(p.encode("utf-8"))``: the same prompt always maps to the same
    embedding, on any machine and rank, and different prompts to unrelated ones.
    """
    rows = []
    for prompt in prompts:
        seed = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "little")
        rows.append(torch.randn(text_len, text_dim, generator=torch.Generator().manual_seed(seed)))
    return torch.stack(rows)


def build_prompt_encoder(args: argparse.Namespace, cfg: WanConfig, device: torch.device) -> PromptEncoder:
    """``list[str] -> [B, L, text_dim]`` on ``device`` from the CLI choice (see `add_text_encoder_args`)."""
    if args.hashed_text_embeddings == (args.text_encoder is not None):
        raise ValueError("pass exactly one of --text_encoder PATH and --hashed_text_embeddings")
    if args.hashed_text_embeddings:
        return lambda prompts: hashed_prompt_embeds(prompts, cfg.text_len, cfg.text_dim).to(device)

    from wan.text_encoder import WanTextEncoder  # transformers is heavy; only load it when used

    if args.text_encoder == "world":  # the shapes world's fixed word embeddings, identical to train.py's
        from world.text import WorldTextEncoder

        world = WorldTextEncoder(cfg.text_dim, cfg.text_len).to(device)
        return lambda prompts: world(prompts)["prompt_embeds"]
    if args.text_encoder == "toy":  # the toy networks' seeded tiny umT5, identical to train.py's
        from wan.toy import toy_text_encoder

        toy = toy_text_encoder(text_dim=cfg.text_dim, text_len=cfg.text_len).to(device)
        return lambda prompts: toy(prompts)["prompt_embeds"]
    path = Path(args.text_encoder)
    if path.is_dir():
        encoder = WanTextEncoder.from_diffusers_folder(path, device=device, text_len=cfg.text_len)
    elif path.is_file():
        if args.tokenizer is None:
            raise ValueError(f"--text_encoder {path} is an original checkpoint; pass --tokenizer FOLDER too")
        encoder = WanTextEncoder.from_original(path, args.tokenizer, device=device, text_len=cfg.text_len)
    else:
        raise FileNotFoundError(f"--text_encoder {path}: no such file or folder")
    if encoder.dim != cfg.text_dim:
        raise ValueError(
            f"text encoder {path} gives {encoder.dim}-d embeddings, the teacher expects {cfg.text_dim}"
        )
    return lambda prompts: encoder(prompts)["prompt_embeds"]


# 4. Job manifest -------------------------------------------------------------------------------------


def _holds_rows(out: Path) -> bool:
    try:
        find_envs(out)
    except LMDBFormatError:
        return False  # neither an environment nor a folder of shards: nothing of ours to clash with
    reader = LMDBReader(out)
    try:
        return len(reader) > 0
    finally:
        reader.close()


def check_output(out: str | os.PathLike, settings: Mapping[str, Any], append: bool) -> bool:
    """Decide whether a job with ``settings`` may write into ``out``; returns True if ``out`` has no
    manifest yet (the caller writes one with :func:`write_manifest` once every rank has checked).

    * nothing there (or an empty folder): a fresh job;
    * a manifest equal to ``settings``: a restarted job, which resumes;
    * a manifest with other settings, or LMDB rows without a manifest (another dataset): refused with
      the differences named, unless ``append`` is set.
    Call it on every rank before any rank writes (all ranks then reach the same verdict).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a directory")
    manifest = out / MANIFEST_NAME
    if manifest.is_file():
        try:
            existing = json.loads(manifest.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{manifest}: not a JSON job manifest ({err})") from err
        expected = json.loads(json.dumps(dict(settings)))  # tuples -> lists, as stored
        if existing == expected:
            return False
        keys = sorted(set(existing) | set(expected))
        diff = "; ".join(
            f"{k}: {existing.get(k)!r} there vs {expected.get(k)!r} now"
            for k in keys
            if existing.get(k) != expected.get(k)
        )
        if not append:
            raise ValueError(
                f"{out} holds a dataset made with different settings ({diff}); pass --append to add "
                "rows to it anyway, or choose another output"
            )
        logger.warning("%s: appending although its settings differ (%s)", out, diff)
        return False
    if out.exists() and _holds_rows(out):
        if not append:
            raise ValueError(
                f"{out} holds an LMDB dataset written by another job (no {MANIFEST_NAME}); pass --append "
                "to add rows to it anyway, or choose another output"
            )
        logger.warning("%s: appending to an LMDB dataset written by another job", out)
    return True


def write_manifest(out: str | os.PathLike, settings: Mapping[str, Any]) -> None:
    """Write ``<out>/job.json`` atomically (rank 0 only)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(dict(settings), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST_NAME)
