"""Intervals for accuracies: a proportion's Wilson interval, and the paired interval of the difference
between two models scored on the same items. Pure Python (the evals, the pipeline's table and the
READMEs' figures use them)."""

from __future__ import annotations

import math


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion.

    >>> tuple(round(x, 3) for x in wilson_interval(50, 100))
    (0.404, 0.596)
    """
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_difference(base: list[bool], other: list[bool], z: float = 1.96) -> tuple[float, float]:
    """Accuracy of `other` minus that of `base` on the same items, and the half-width of its 95% interval
    for paired data: with b items only `other` gets right and c only `base` does, out of n,
    diff = (b - c) / n and se = sqrt(b + c - (b - c)^2 / n) / n (the interval of McNemar's setting).

    >>> tuple(round(x, 4) for x in paired_difference([1, 1, 0, 0, 1], [1, 0, 1, 1, 1]))
    (0.2, 0.6559)
    """
    if len(base) != len(other):
        raise ValueError(f"paired_difference: {len(base)} items against {len(other)}; both must score the same items")
    n = len(base)
    if n == 0:
        return 0.0, 1.0
    gained = sum(1 for a, b in zip(base, other) if b and not a)
    lost = sum(1 for a, b in zip(base, other) if a and not b)
    se = math.sqrt(max(gained + lost - (gained - lost) ** 2 / n, 0.0)) / n
    return (gained - lost) / n, z * se
