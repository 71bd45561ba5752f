"""95% confidence intervals for the shapes world's metrics, and the one rule for "A beats B".

Samples are treated as independent draws: every evaluated video has its own noise seed, so its
outcome (attributes right or not, coherent or not, ...) is a Bernoulli draw with the method's true
rate, and its continuous scores (RMSE, trajectory error) are i.i.d. draws around the method's mean.
What is *not* independent is the frames inside one video, so per-frame rates are intervals over
videos (see `evaluate.summarise`), never over frames.

- Rates get the Wilson score interval (Wilson 1927): unlike the normal ("Wald") interval it stays
  inside [0, 1] and does not collapse to a point at 0 or 1, which is where the world's strict rates
  often sit. A mean of per-sample shares in [0, 1] (e.g. the share of coherent frames of each video)
  also gets the Wilson interval with n = number of samples: a [0, 1] variable with mean p has
  variance at most p(1 - p), the Bernoulli variance the interval assumes, so it is conservative.
- Continuous means get the normal-approximation interval mean +- z * s / sqrt(n) (s: sample std).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist

Z95 = NormalDist().inv_cdf(0.975)  # two-sided 95%: 1.95996...

# The direction of "better" for every summary key that has an interval.
HIGHER_IS_BETTER = frozenset(
    {
        "colour",
        "shape",
        "direction",
        "speed",
        "all_attributes",
        "coherence",
        "frame_coherence",
        "precision",
        "shades_hit",
        "all_shades_hit",
        "accuracy",  # continuation accuracy (world.continuation)
        "shade_kept",
    }
)
LOWER_IS_BETTER = frozenset({"rmse", "trajectory_error", "shade_tv"})


def wilson_interval(rate: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion observed as `rate` over `n` independent draws.

    The interval is the set of true rates p with |rate - p| <= z * sqrt(p (1 - p) / n), i.e. the two
    roots of (1 + z^2/n) p^2 - (2 rate + z^2/n) p + rate^2 = 0:
        centre = (rate + z^2 / 2n) / (1 + z^2/n)
        half   = z / (1 + z^2/n) * sqrt(rate (1 - rate) / n + z^2 / 4n^2)
    """
    if n < 1:
        raise ValueError(f"wilson_interval: needs at least one draw, got n={n}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"wilson_interval: rate must be in [0, 1], got {rate}")
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (rate + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(rate * (1.0 - rate) / n + z2 / (4 * n * n))
    # The interval always contains `rate` (|rate - p| = 0 at p = rate); at rate 0 or 1 rounding can
    # put an end a hair inside it, so the ends are clamped to [0, rate] and [rate, 1].
    return min(max(0.0, centre - half), rate), max(min(1.0, centre + half), rate)


def mean_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float]:
    """Normal-approximation interval of the mean of `values`: mean +- z * s / sqrt(n), s with n - 1
    degrees of freedom. One value says nothing about the spread: the interval is (-inf, inf)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_interval: no values")
    mean = math.fsum(values) / n
    if n == 1:
        return -math.inf, math.inf
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = z * std / math.sqrt(n)
    return mean - half, mean + half


def with_interval(summary: Mapping[str, object], key: str, digits: int = 2) -> str:
    """`summary[key]` and its 95% interval `summary["<key>_ci"]` as `0.53 [0.45, 0.61]`."""
    lo, hi = summary[f"{key}_ci"]
    return f"{summary[key]:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def beats(a: Mapping[str, object], b: Mapping[str, object], key: str) -> bool:
    """True when summary `a` is better than summary `b` on `key` beyond the 95% intervals: the
    intervals `<key>_ci` do not overlap (touching counts as overlap) and `a`'s lies on the better side."""
    if key not in HIGHER_IS_BETTER and key not in LOWER_IS_BETTER:
        known = sorted(HIGHER_IS_BETTER | LOWER_IS_BETTER)
        raise ValueError(f"beats: no direction of 'better' is known for {key!r}; known keys: {known}")
    ci = f"{key}_ci"
    for name, summary in (("a", a), ("b", b)):
        if ci not in summary:
            raise ValueError(f"beats: summary {name} has no {ci!r} (was it written by world.evaluate?)")
    (a_lo, a_hi), (b_lo, b_hi) = a[ci], b[ci]
    return a_lo > b_hi if key in HIGHER_IS_BETTER else a_hi < b_lo
