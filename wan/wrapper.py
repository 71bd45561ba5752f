"""`WanDiffusionWrapper`: the DiT seen from pipelines and objectives.

It converts layouts (`[B, F, C, H, W]` outside, `[B, C, F, H, W]` inside the DiT) and turns the flow
prediction into an x0 prediction with the continuous sigma = t/1000 (spec §11: no round trips through
a quantised grid). It holds the DiT as `self.model`, so its state dict carries upstream's
`model.`-prefixed keys and Self-Forcing checkpoints load into it directly.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn

from .causal_model import CausalWanModel
from .gan_head import classify_forward
from .model import WanModel


class _Sigma(Protocol):
    def x0_from_flow(self, x_t: torch.Tensor, flow: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


class WanDiffusionWrapper(nn.Module):
    def __init__(self, model: WanModel | CausalWanModel, scheduler: _Sigma) -> None:
        super().__init__()
        self.model = model
        self.scheduler = scheduler

    @property
    def config(self):
        return self.model.config

    @property
    def is_causal(self) -> bool:
        return isinstance(self.model, CausalWanModel)

    def forward(
        self,
        noisy: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        classify: bool = False,
        **model_kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """
        Args:
            noisy: `[B, F, C, H, W]` noisy latents.
            timestep: `[B, F]` (or `[B]`) on the 0..1000 scale.
            context: text embeddings `[B, L, text_dim]`.
            model_kwargs: passed to the DiT (`kv_cache`, `crossattn_cache`, `current_start_frame`,
                `clean_x` as `[B, F, C, H, W]`, `aug_t`).
            classify: run the GAN discriminator head instead (see `wan.gan_head`).
        Returns:
            `(flow_pred, x0_pred)`, both `[B, F, C, H, W]`; with `classify`, logits `[B, num_class]`.
        """
        if classify:
            return classify_forward(self, noisy, timestep, context)
        if "clean_x" in model_kwargs and model_kwargs["clean_x"] is not None:
            model_kwargs["clean_x"] = model_kwargs["clean_x"].transpose(1, 2)
        # contiguous: FSDP warns that in-place ops on a returned view would skip its backward hook
        flow = (
            self.model(noisy.transpose(1, 2), timestep, context, **model_kwargs).transpose(1, 2).contiguous()
        )
        t = torch.as_tensor(timestep, device=noisy.device)
        return flow, self.scheduler.x0_from_flow(noisy, flow, t)
