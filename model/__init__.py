"""Training objectives behind one interface (`model.base.Objective`), and `build_objective`.

Names: `dmd`, `sid`, `gan`, `ode`, `diffusion`, `causvid`, `teacher_regression` (the values of the config's `trainer` key).
"""

from __future__ import annotations

from .base import GeneratorOutput, Objective, ScoreTimestepSampler, SelfForcingGenerator
from .causvid import CausVid
from .diffusion import CausalDiffusion
from .dmd import DMD
from .gan import GAN
from .ode_regression import ODERegression
from .sid import SiD
from .teacher_regression import TeacherRegression

__all__ = [
    "DMD",
    "GAN",
    "OBJECTIVES",
    "CausVid",
    "CausalDiffusion",
    "GeneratorOutput",
    "ODERegression",
    "Objective",
    "ScoreTimestepSampler",
    "SelfForcingGenerator",
    "SiD",
    "TeacherRegression",
    "build_objective",
]

OBJECTIVES: dict[str, type[Objective]] = {
    "dmd": DMD,
    "sid": SiD,
    "gan": GAN,
    "ode": ODERegression,
    "diffusion": CausalDiffusion,
    "causvid": CausVid,
    "teacher_regression": TeacherRegression,
}


def build_objective(name: str, *args, **modules_and_kwargs) -> Objective:
    """Construct the objective `name` from modules and plain values (see each class for its arguments).

    dmd / sid: `generator, real_score, fake_score, scheduler, rollout=..., ...`; causvid: `generator,
    real_score, fake_score, scheduler, ...`; gan: `generator, critic, scheduler, rollout=..., ...`;
    ode: `generator, ...`; diffusion: `generator, scheduler, ...`. `rollout` is a
    `SelfForcingGenerator.build(generator, scheduler, image_or_video_shape=..., ...)`, which owns the
    rollout settings.
    """
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    try:
        return cls(*args, **modules_and_kwargs)
    except TypeError as err:
        raise TypeError(f"build_objective({name!r}) -> {cls.__name__}: {err}") from err
