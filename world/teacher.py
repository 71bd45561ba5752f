"""The exact teacher: the posterior mean of the shapes world, behind `WanDiffusionWrapper`'s interface.

A prompt describes a few clips x0_i (one per background shade; with `random_start`, one per shade and
start along the path), equally likely. Under flow matching
`x_t = (1 - s) x0 + s * noise` (s = sigma = t / 1000, per frame), the denoiser is closed form:

    E[x0 | x_t, c] = sum_i softmax_i( -sum_f ||x_t,f - (1 - s_f) x0_i,f||^2 / (2 s_f^2) ) x0_i

over the prompt's clips; the unconditional denoiser (the empty prompt, used by classifier-free
guidance) is the same formula over every clip of the world. The flow is `(x_t - x0_hat) / s`. It is
the real score of DMD/SiD and the teacher of `scripts/generate_ode_pairs.py`; it needs no training.
It is differentiable in `x_t` (SiD backpropagates through the real score).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .codec import WorldCodec
from .render import Prompt, all_prompts, render_prompt
from .text import WorldTextEncoder

MIN_SIGMA = 1e-4  # below this the posterior is a hard nearest-clip choice; avoid dividing by zero
UNCOND_CHUNK_ELEMENTS = 1 << 22  # bounds the unconditional posterior's temporary differences (16 MiB)


class ExactTeacher(nn.Module):
    """(noisy `[B, F, C, h, w]`, t `[B, F]` | `[B]`, context `[B, L, text_dim]`) -> (flow, x0).

    Args:
        text_encoder: the world's encoder (default: `WorldTextEncoder()`, the one the world's configs
            name); the teacher recognises a prompt by its embedding.
        prompts: the prompts it knows (default: the whole world, held-out prompts included: the
            teacher stands for the true distribution).
        random_start: the world whose objects start anywhere along their path (`world.render`).
    """

    def __init__(
        self,
        text_encoder: WorldTextEncoder | None = None,
        prompts: list[Prompt] | None = None,
        random_start: bool = False,
    ) -> None:
        super().__init__()
        self.random_start = bool(random_start)
        text_encoder = text_encoder if text_encoder is not None else WorldTextEncoder()
        self.prompts = list(prompts) if prompts is not None else all_prompts()
        keys = text_encoder([p.text for p in self.prompts])["prompt_embeds"]
        self.register_buffer("keys", keys.flatten(1), persistent=False)  # [P, text_len*text_dim]
        self.register_buffer("key_norms", self.keys.norm(dim=1), persistent=False)  # [P]
        self.text_len, self.text_dim = keys.shape[1:]
        self.codec = WorldCodec()
        self._clips: dict[int, Tensor] = {}

    def clip_latents(self, num_frames: int) -> Tensor:
        """`[P, K, F, C, h, w]` latents of every clip of every prompt (cached per length)."""
        if num_frames not in self._clips:
            videos = torch.stack([render_prompt(p, num_frames, self.random_start) for p in self.prompts])
            p, s = videos.shape[:2]
            lat = self.codec.encode(videos.flatten(0, 1).transpose(1, 2))  # [P*K, F, C, h, w]
            self._clips[num_frames] = lat.unflatten(0, (p, s)).to(self.keys.device)
        return self._clips[num_frames]

    def prompt_index(self, context: Tensor) -> Tensor:
        """Which prompt each context row `[B, L, text_dim]` encodes: `[B]` long, -1 for the empty prompt
        (unconditional). One distance matrix for the whole batch; a row that matches no prompt is an error."""
        _, length, dim = context.shape
        if dim != self.text_dim or length > self.text_len:
            raise ValueError(
                f"ExactTeacher: context must be [B, <= {self.text_len}, {self.text_dim}], got {tuple(context.shape)}"
            )
        flat = context.float().flatten(1)  # [B, length * dim]: pad to the keys' text_len with zeros
        flat = torch.nn.functional.pad(flat, (0, self.keys.shape[1] - flat.shape[1]))
        dist = torch.cdist(flat, self.keys.float())  # [B, P]
        best, index = dist.min(dim=1)
        empty = flat.abs().amax(dim=1) == 0
        # Relative tolerance: bf16 embeddings still match their prompt.
        unknown = ~empty & (best > 1e-2 * (1.0 + self.key_norms[index]))
        if bool(unknown.any()):
            nearest = best[unknown][0].item()
            raise ValueError(
                f"ExactTeacher: a context matches no shapes-world prompt (nearest distance {nearest:.3g})"
            )
        return torch.where(empty, torch.full_like(index, -1), index)

    @staticmethod
    def posterior_mean(noisy: Tensor, sigma: Tensor, candidates: Tensor) -> Tensor:
        """`E[x0 | x_t]` for x0 uniform over each row's candidates.

        Args:
            noisy: `[B, F, C, h, w]` float32.
            sigma: `[B, F]` per-frame noise level (already clamped away from 0).
            candidates: `[B, K, F, C, h, w]` (each row its own K clips) or `[1, K, F, C, h, w]` (shared).
        Returns:
            `[B, F, C, h, w]`.
        """
        s = sigma[:, None, :, None, None, None]  # [B, 1, F, 1, 1, 1]
        # Divided before summing, as the per-row loop did: the same rounding, so runs stay bitwise.
        sq = ((noisy[:, None] - (1 - s) * candidates) ** 2 / (2 * s**2)).sum(dim=(3, 4, 5))  # [B, K, F]
        weights = torch.softmax(-sq.sum(dim=2), dim=1)  # [B, K]: log N(x_t; (1-s) x0_k, s^2) + const
        x0 = weights[:, None] @ candidates.flatten(2)  # [B, 1, K] @ [B | 1, K, F*C*h*w]
        return x0.view(noisy.shape)

    def forward(self, noisy: Tensor, timestep: Tensor, context: Tensor, **unused) -> tuple[Tensor, Tensor]:
        if unused.get("kv_cache") is not None or unused.get("clean_x") is not None:
            raise ValueError("ExactTeacher is bidirectional: no KV cache, no teacher forcing")
        b, f = noisy.shape[:2]
        t = torch.as_tensor(timestep, device=noisy.device, dtype=torch.float32)
        t = t.expand(b) if t.dim() == 0 else t
        t = t[:, None].expand(b, f) if t.dim() == 1 else t
        sigma = (t / 1000.0).clamp(min=MIN_SIGMA)
        clips = self.clip_latents(f).to(noisy.device)  # [P, K, F, C, h, w]
        x = noisy.float()
        index = self.prompt_index(context)
        cond = (index >= 0).nonzero().flatten()
        uncond = (index < 0).nonzero().flatten()
        x0 = x.new_empty(x.shape)
        if len(cond):  # a prompt's own K clips
            x0[cond] = self.posterior_mean(x[cond], sigma[cond], clips[index[cond]])
        # The empty prompt: every clip of the world. Rows in chunks, so the [rows, P*K, F, C, h, w]
        # differences stay near UNCOND_CHUNK_ELEMENTS elements.
        every = clips.flatten(0, 1)[None]
        rows = max(1, UNCOND_CHUNK_ELEMENTS // every.numel())
        for chunk in uncond.split(rows):
            x0[chunk] = self.posterior_mean(x[chunk], sigma[chunk], every)
        flow = (x - x0) / sigma[:, :, None, None, None]
        return flow.to(noisy.dtype), x0.to(noisy.dtype)
