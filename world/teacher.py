"""The exact teacher: the posterior mean of the shapes world, behind `WanDiffusionWrapper`'s interface.

A prompt describes a few clips x0_i (one per background shade), equally likely. Under flow matching
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


class ExactTeacher(nn.Module):
    """(noisy `[B, F, C, h, w]`, t `[B, F]` | `[B]`, context `[B, L, text_dim]`) -> (flow, x0).

    Args:
        text_encoder: the world's encoder; the teacher recognises a prompt by its embedding.
        prompts: the prompts it knows (default: the whole world, held-out prompts included: the
            teacher stands for the true distribution).
    """

    def __init__(self, text_encoder: WorldTextEncoder, prompts: list[Prompt] | None = None) -> None:
        super().__init__()
        self.prompts = list(prompts) if prompts is not None else all_prompts()
        keys = text_encoder([p.text for p in self.prompts])["prompt_embeds"]
        self.register_buffer("keys", keys.flatten(1), persistent=False)  # [P, text_len*text_dim]
        self.text_len, self.text_dim = keys.shape[1:]
        self.codec = WorldCodec()
        self._clips: dict[int, Tensor] = {}

    def clip_latents(self, num_frames: int) -> Tensor:
        """`[P, S, F, C, h, w]` latents of every clip of every prompt (cached per length)."""
        if num_frames not in self._clips:
            videos = torch.stack([render_prompt(p, num_frames) for p in self.prompts])  # [P,S,F,3,H,W]
            p, s = videos.shape[:2]
            lat = self.codec.encode(videos.flatten(0, 1).transpose(1, 2))  # [P*S, F, C, h, w]
            self._clips[num_frames] = lat.unflatten(0, (p, s)).to(self.keys.device)
        return self._clips[num_frames]

    def prompt_index(self, context: Tensor) -> list[int | None]:
        """Which prompt each context row encodes (None: the empty prompt = unconditional)."""
        b, length, dim = context.shape
        if dim != self.text_dim or length > self.text_len:
            raise ValueError(
                f"ExactTeacher: context must be [B, <= {self.text_len}, {self.text_dim}], got {tuple(context.shape)}"
            )
        padded = context.new_zeros(b, self.text_len, dim)
        padded[:, :length] = context
        flat = padded.flatten(1).float()
        dist = torch.cdist(flat, self.keys.float())  # [B, P]
        best, index = dist.min(dim=1)
        out: list[int | None] = []
        for row, d, i in zip(flat, best.tolist(), index.tolist(), strict=True):
            if row.abs().max() == 0:
                out.append(None)
            elif d <= 1e-2 * (1.0 + self.keys[i].norm().item()):  # bf16 embeddings still match
                out.append(i)
            else:
                raise ValueError(
                    f"ExactTeacher: a context matches no shapes-world prompt (nearest distance {d:.3g})"
                )
        return out

    def denoise(self, noisy: Tensor, sigma: Tensor, candidates: Tensor) -> Tensor:
        """Posterior mean over `candidates` `[N, F, C, h, w]` for one sample `noisy` `[F, C, h, w]`,
        per-frame sigma `[F]` -> `[F, C, h, w]`."""
        s = sigma.clamp(min=MIN_SIGMA).view(1, -1, 1, 1, 1)
        sq = ((noisy[None] - (1 - s) * candidates) ** 2 / (2 * s**2)).sum(dim=(2, 3, 4))  # [N, F]
        weights = torch.softmax(-sq.sum(dim=1), dim=0)  # [N]
        return torch.einsum("n,nfchw->fchw", weights, candidates)

    def forward(self, noisy: Tensor, timestep: Tensor, context: Tensor, **unused) -> tuple[Tensor, Tensor]:
        if unused.get("kv_cache") is not None or unused.get("clean_x") is not None:
            raise ValueError("ExactTeacher is bidirectional: no KV cache, no teacher forcing")
        b, f = noisy.shape[:2]
        t = torch.as_tensor(timestep, device=noisy.device, dtype=torch.float32)
        t = t.expand(b) if t.dim() == 0 else t
        t = t[:, None].expand(b, f) if t.dim() == 1 else t
        sigma = t / 1000.0
        clips = self.clip_latents(f).to(noisy.device)
        x = noisy.float()
        x0 = torch.stack(
            [
                self.denoise(x[i], sigma[i], clips.flatten(0, 1) if p is None else clips[p])
                for i, p in enumerate(self.prompt_index(context))
            ]
        )
        s = sigma.clamp(min=MIN_SIGMA)[:, :, None, None, None]
        flow = (x - x0) / s
        return flow.to(noisy.dtype), x0.to(noisy.dtype)
