"""CausVid-style DMD (Yin et al. 2025, "From Slow Bidirectional to Fast Autoregressive Video
Diffusion Models"), spec §5.7.

No autoregressive rollout: the generator's input is built from a clean data latent, noised to a
randomly chosen step of `denoising_step_list` per chunk, and denoised in one block-causal
training-path forward (optionally teacher-forced on the clean latent). Its x0 prediction is then
scored with the DMD loss of spec §5.2; the critic is trained as in DMD on a no-grad sample made the
same way. Upstream's trainer never passed the clean latent, so this path crashed (spec §9.3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from utils.scheduler import FlowMatchScheduler
from wan import WanDiffusionWrapper

from .base import GeneratorOutput, require, sample_per_chunk
from .dmd import ScoreDistillation

__all__ = ["CausVid"]


class CausVid(ScoreDistillation):
    """DMD on one-forward generator outputs built from `batch["clean_latent"]`.

    Args (beyond `ScoreDistillation`; `ts_schedule`/`ts_schedule_max` have no rollout interval to
    use here and are ignored):
        denoising_step_list: timesteps (already warped), high to low; an entry 0 means "clean input".
        num_frame_per_block, independent_first_frame: the chunk layout (one random step per chunk).
        teacher_forcing: give the generator the clean latent as context (`clean_x`).
    """

    def __init__(
        self,
        generator: WanDiffusionWrapper,
        real_score: WanDiffusionWrapper,
        fake_score: WanDiffusionWrapper,
        scheduler: FlowMatchScheduler,
        *,
        denoising_step_list: Sequence[float] = (1000, 750, 500, 250),
        num_frame_per_block: int = 3,
        independent_first_frame: bool = False,
        teacher_forcing: bool = False,
        **score_kwargs,
    ) -> None:
        super().__init__(generator, real_score, fake_score, scheduler, **score_kwargs)
        if len(denoising_step_list) == 0:
            raise ValueError("denoising_step_list is empty")
        self.register_buffer(
            "denoising_step_list",
            torch.as_tensor(list(denoising_step_list), dtype=torch.float32),
            persistent=False,
        )
        self.num_frame_per_block = num_frame_per_block
        self.independent_first_frame = independent_first_frame
        self.teacher_forcing = teacher_forcing

    def generate(self, batch: dict[str, Tensor], shared: dict[str, Any]) -> GeneratorOutput:
        """x0 prediction `[B, F, C, H, W]` of one training-path forward on per-chunk noised clean latents."""
        clean = require(batch, "clean_latent", "CausVid", ndim=5)
        b, f = clean.shape[:2]
        steps = self.denoising_step_list.to(clean.device)
        index = sample_per_chunk(
            0, len(steps), b, f, self.num_frame_per_block, self.independent_first_frame, clean.device
        )
        t = steps[index]  # [B, F]
        # Every frame is noised to its own chunk's step (add_noise broadcasts t per frame; t=0 is clean).
        noisy = self.scheduler.add_noise(clean, torch.randn_like(clean), t)
        extra = {"clean_x": clean} if self.teacher_forcing else {}
        _, x0 = self.generator(noisy, t, batch["prompt_embeds"], **extra)
        return GeneratorOutput(x0)
