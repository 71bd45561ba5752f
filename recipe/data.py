"""The run's data: the dataset its objective reads, checked on every rank before training."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from utils.config import TrainConfig
from utils.dataset import LatentLMDBDataset, ODERegressionLMDBDataset, TextDataset, check_row_shape
from utils.distributed import raise_user_error_everywhere
from utils.errors import UserError


def open_dataset(cfg: TrainConfig) -> Dataset:
    """Open and check the data on every rank; any problem is one `UserError` on every rank."""
    dataset, error = None, None
    try:
        dataset = _open(cfg)
    except UserError as err:
        error = err
    except (OSError, ValueError) as err:  # unreadable file, bad prompt file, bad rows
        error = UserError(f"data_path={cfg.data_path!r}: {err}")
    raise_user_error_everywhere(error)
    return dataset


def _open(cfg: TrainConfig) -> Dataset:
    if cfg.data_path is None:
        raise UserError(
            "data_path is not set: a prompt file (dmd/sid) or an LMDB directory (gan/ode/diffusion/causvid)"
        )
    f, c, h, w = cfg.latent_shape
    if cfg.trainer in ("dmd", "sid") and not cfg.i2v:  # i2v: the first frame comes from video latents
        return TextDataset(cfg.data_path)
    if cfg.trainer == "ode":
        dataset = ODERegressionLMDBDataset(cfg.data_path, max_pair=cfg.max_pair)
        check_row_shape(dataset, (len(cfg.denoising_step_list), f, c, h, w), "ode_latent [K+1, F, C, H, W]")
        return dataset
    dataset = LatentLMDBDataset(cfg.data_path, with_image_latent=cfg.i2v)
    # i2v DMD/SiD read only the first latent frame of each clip: any clip length will do
    frames = None if cfg.trainer in ("dmd", "sid") else f
    check_row_shape(dataset, (frames, c, h, w), "clean_latent [F, C, H, W]")
    return dataset


class Batches:
    """The step's micro-batches: the loader's rows with their prompts encoded (`prompt_embeds`
    `[B, L, D]`), the negative prompt's embedding (one per batch size: upstream cached the first
    only) and the latents the objective reads, on `device` in `dtype`."""

    def __init__(self, loader, text_encoder, negative_prompt: str, device: torch.device, dtype: torch.dtype):
        self.loader, self.text_encoder, self.negative_prompt = loader, text_encoder, negative_prompt
        self.device, self.dtype = device, dtype
        self._negative: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def next(self) -> dict[str, torch.Tensor]:
        raw = next(self.loader)
        prompts = list(raw["prompts"])
        batch = {"prompt_embeds": self.text_encoder(prompts)["prompt_embeds"].to(self.device, self.dtype)}
        b = len(prompts)
        if b not in self._negative:
            neg = self.text_encoder([self.negative_prompt])["prompt_embeds"]
            self._negative[b] = neg.to(self.device, self.dtype).expand(b, -1, -1).contiguous()
        batch["negative_prompt_embeds"] = self._negative[b]
        for key in ("clean_latent", "ode_latent", "image_latent"):
            if key in raw:
                batch[key] = raw[key].to(self.device, self.dtype)
        return batch
