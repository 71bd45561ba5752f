"""The shapes world's text encoder: the world's vocabulary with fixed seeded word embeddings, behind
the umT5 encoder's interface (`wan.text_encoder.WanTextEncoder`: `list[str] -> {"prompt_embeds"}`).

Word i of a prompt becomes row i of `[text_len, text_dim]` (the embedding of that word); rows past the
prompt are zero, as umT5's are past the true length. The empty prompt is all zeros: it is the world's
negative prompt, the unconditional input of classifier-free guidance.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .render import COLOURS, DIRECTIONS, SHAPES, SPEEDS

VOCABULARY: tuple[str, ...] = ("a", "moving", *COLOURS, *SHAPES, *DIRECTIONS, *SPEEDS)
EMBEDDING_SEED = 2024


class WorldTextEncoder(nn.Module):
    def __init__(self, text_dim: int = 32, text_len: int = 8, seed: int = EMBEDDING_SEED) -> None:
        super().__init__()
        self.text_len = text_len
        g = torch.Generator().manual_seed(seed)
        table = torch.randn(len(VOCABULARY), text_dim, generator=g)
        self.register_buffer("table", table, persistent=False)  # a pure function of the seed
        self._index = {w: i for i, w in enumerate(VOCABULARY)}

    @property
    def dim(self) -> int:
        return self.table.shape[1]

    @property
    def device(self) -> torch.device:
        return self.table.device

    def train(self, mode: bool = True) -> WorldTextEncoder:
        return super().train(False)

    def tokenize(self, prompt: str) -> list[int]:
        words = prompt.lower().split()
        unknown = [w for w in words if w not in self._index]
        if unknown:
            raise ValueError(
                f"prompt {prompt!r}: words {unknown} are not in the shapes world's vocabulary {list(VOCABULARY)}"
            )
        if len(words) > self.text_len:
            raise ValueError(f"prompt {prompt!r} has {len(words)} words, more than text_len={self.text_len}")
        return [self._index[w] for w in words]

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> dict[str, Tensor]:
        out = self.table.new_zeros(len(prompts), self.text_len, self.dim)
        for b, prompt in enumerate(prompts):
            ids = self.tokenize(prompt)
            if ids:
                out[b, : len(ids)] = self.table[ids]
        return {"prompt_embeds": out}
