"""The shapes world: a video distribution known exactly, so the Self-Forcing recipe can be measured.

A clip is 16x16 RGB. One object (a square or a circle, in one of 4 colours) starts at the centre and
moves left, right, up or down, slowly (1 px/frame) or fast (2 px/frame), bouncing off the walls, on
one of 3 background shades. A prompt names the object and its motion ("a red square moving left
fast"); the background shade is the diversity inside a prompt (3 clips per prompt). Every clip is a
pure function of its attributes and its length, so the data set is rendered on the fly, any length:
the truth of a 36-frame rollout is known as exactly as that of a 12-frame one.

With `random_start` the object starts anywhere along its path instead of at the centre (its centre
pixel at frame 0 is one of the STARTS positions on the axis of motion, heading the way the prompt
says): 8 starts x 3 shades = 24 clips per prompt. Then no frame index tells where the object is;
only the earlier frames do, which is what a rollout past the training length has to rely on.

Pixels are in [-1, 1] (the VAE convention), layout `[F, 3, H, W]`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import product

import torch

SIZE = 16  # frame height and width in pixels
RADIUS = 2  # the object fills a 5x5 box around its centre pixel (the circle drops the box's corners)
LOW, HIGH = RADIUS, SIZE - 1 - RADIUS  # range of the centre pixel: the object stays inside the frame
START = SIZE // 2 - 1  # centre pixel at frame 0 (the 16-pixel frame has no single centre pixel)
# random_start: the object's frame-0 position along its axis. Its first step never bounces (at either
# speed), so no clip of one direction is also a clip of the opposite one (from LOW, "left" would
# bounce at once and draw the very clip "right" draws from LOW). 8 starts, the centre among them.
STARTS = tuple(range(LOW + 2, HIGH - 2 + 1))

# Colours in [0, 1] RGB: saturated hues, far from every background grey and from each other.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.10, 0.10),
    "green": (0.10, 0.85, 0.15),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.10),
}
SHAPES = ("square", "circle")
DIRECTIONS: dict[str, tuple[int, int]] = {  # (dy, dx) of one step; y grows downwards
    "left": (0, -1),
    "right": (0, 1),
    "up": (-1, 0),
    "down": (1, 0),
}
SPEEDS: dict[str, int] = {"slow": 1, "fast": 2}  # pixels per frame
SHADES: tuple[float, ...] = (0.15, 0.40, 0.65)  # background grey levels in [0, 1]

ATTRIBUTES = ("colour", "shape", "direction", "speed")


@dataclass(frozen=True)
class Prompt:
    """What a prompt says: every attribute of a clip except the background shade."""

    colour: str
    shape: str
    direction: str
    speed: str

    @property
    def text(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction} {self.speed}"

    @staticmethod
    def parse(text: str) -> Prompt:
        words = text.split()
        if len(words) != 6 or words[0] != "a" or words[3] != "moving":
            raise ValueError(
                f"not a shapes-world prompt: {text!r} (expected 'a <colour> <shape> moving <dir> <speed>')"
            )
        prompt = Prompt(words[1], words[2], words[4], words[5])
        for value, choices in zip(
            (prompt.colour, prompt.shape, prompt.direction, prompt.speed),
            (COLOURS, SHAPES, DIRECTIONS, SPEEDS),
            strict=True,
        ):
            if value not in choices:
                raise ValueError(f"{text!r}: unknown word {value!r}; choose one of {sorted(choices)}")
        return prompt


@dataclass(frozen=True)
class Clip:
    prompt: Prompt
    shade: int  # index into SHADES
    start: int = START  # the centre's coordinate along the axis of motion at frame 0


def all_prompts() -> list[Prompt]:
    """The 64 prompts in a fixed order."""
    return [Prompt(*values) for values in product(COLOURS, SHAPES, DIRECTIONS, SPEEDS)]


def starts(random_start: bool) -> tuple[int, ...]:
    """The frame-0 positions along the axis of motion a clip may have."""
    return STARTS if random_start else (START,)


def clips_of(prompt: Prompt, random_start: bool = False) -> list[Clip]:
    """The clips a prompt describes, equally likely: one per background shade (and, with
    `random_start`, per start along the path), shade-major: clip k has shade k // len(starts)."""
    return [Clip(prompt, s, p) for s in range(len(SHADES)) for p in starts(random_start)]


def split_prompts(num_heldout: int = 10, seed: int = 0) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held-out): a seeded choice of held-out prompts such that every attribute value is still
    seen in training (so held-out prompts test composition, not unseen words)."""
    prompts = all_prompts()
    rng = random.Random(seed)
    while True:
        heldout = set(rng.sample(range(len(prompts)), num_heldout))
        train = [p for i, p in enumerate(prompts) if i not in heldout]
        if all({getattr(p, a) for p in train} == {getattr(p, a) for p in prompts} for a in ATTRIBUTES):
            return train, [prompts[i] for i in sorted(heldout)]


def reflect(position: int, low: int = LOW, high: int = HIGH) -> int:
    """Bounce: fold an unbounded 1-D position into [low, high] (a triangle wave of period 2(high-low))."""
    period = 2 * (high - low)
    offset = (position - low) % period
    return low + (offset if offset <= high - low else period - offset)


def trajectory(prompt: Prompt, num_frames: int, start: int = START) -> list[tuple[int, int]]:
    """Centre pixel (y, x) of the object in every frame; `start` is its frame-0 coordinate along the
    axis of motion (the other coordinate is the centre's)."""
    dy, dx = DIRECTIONS[prompt.direction]
    v = SPEEDS[prompt.speed]
    y0, x0 = (start, START) if dy else (START, start)
    return [(reflect(y0 + dy * v * f), reflect(x0 + dx * v * f)) for f in range(num_frames)]


def object_mask(shape: str, y: int, x: int) -> torch.Tensor:
    """Boolean `[H, W]` footprint of an object centred on pixel (y, x)."""
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    dy, dx = (yy - y).abs(), (xx - x).abs()
    box = (dy <= RADIUS) & (dx <= RADIUS)
    if shape == "circle":
        return box & (dy * dy + dx * dx <= RADIUS * RADIUS + 1)
    return box


def render(clip: Clip, num_frames: int) -> torch.Tensor:
    """The clip as pixels `[F, 3, H, W]` in [-1, 1] (float32)."""
    colour = torch.tensor(COLOURS[clip.prompt.colour]).view(3, 1, 1)
    frames = torch.full((num_frames, 3, SIZE, SIZE), SHADES[clip.shade])
    for f, (y, x) in enumerate(trajectory(clip.prompt, num_frames, clip.start)):
        mask = object_mask(clip.prompt.shape, y, x)
        frames[f] = torch.where(mask, colour, frames[f])
    return frames * 2.0 - 1.0


def render_prompt(prompt: Prompt, num_frames: int, random_start: bool = False) -> torch.Tensor:
    """All clips of a prompt, `[K, F, 3, H, W]` in `clips_of` order (K = shades x starts)."""
    return torch.stack([render(c, num_frames) for c in clips_of(prompt, random_start)])
