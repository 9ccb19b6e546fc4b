"""Intervals and paired tests for attack success rates, and the three-valued verdict of a claimed reduction.

- :func:`wilson_interval` — the 95% Wilson score interval of a proportion k/n (good at small n and near 0 or 1,
  where the normal interval fails).
- :func:`mcnemar_exact` — the exact two-sided McNemar test of two paired binary outcomes (the same prompts and
  sampling seeds attacked on an aligned model and on an intervention): a binomial test on the discordant pairs.
- :func:`paired_reduction` — the relative reduction 1 − ASR_b / ASR_a and the absolute difference, with
  percentile intervals from a cluster bootstrap over prompts (several sampling seeds of one prompt are not
  independent, so prompts, not rows, are resampled).
- :func:`verdict` — "reproduced" when the interval of the reduction excludes zero in the paper's direction,
  "not reproduced" when it excludes the paper's effect size, "inconclusive" otherwise.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Sequence

__all__ = ["Z95", "wilson_interval", "mcnemar_exact", "paired_reduction", "verdict"]

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``successes / n``:

    (p̂ + z²/2n ± z·sqrt(p̂(1 − p̂)/n + z²/4n²)) / (1 + z²/n)
    """
    if n < 1:
        raise ValueError(f"a proportion needs n >= 1 observations, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact McNemar test of paired outcomes ``a[i]``, ``b[i]`` (True = attack succeeded).

    With n10 = #(a and not b) and n01 = #(b and not a), under H0 the n10 + n01 discordant pairs split as
    Binomial(n10 + n01, ½); the two-sided p-value is min(1, 2·P[X ≤ min(n10, n01)]).
    """
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    n10 = sum(1 for x, y in zip(a, b) if x and not y)
    n01 = sum(1 for x, y in zip(a, b) if y and not x)
    m = n10 + n01
    tail = sum(math.comb(m, i) for i in range(min(n10, n01) + 1)) / 2**m if m else 1.0
    return {"n10": n10, "n01": n01, "discordant": m, "p_value": min(1.0, 2 * tail)}


def _rates(pairs: Sequence[tuple[bool, bool]]) -> tuple[float, float]:
    n = len(pairs)
    return sum(x for x, _ in pairs) / n, sum(y for _, y in pairs) / n


def paired_reduction(
    a: Sequence[bool],
    b: Sequence[bool],
    clusters: Sequence[Hashable] | None = None,
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """ASR of ``a`` (aligned) and ``b`` (intervention) on the same rows, their difference and the relative
    reduction 1 − ASR_b/ASR_a, with percentile intervals from a bootstrap over ``clusters`` (e.g. the prompt of
    each row; default: every row its own cluster). Deterministic for a given ``seed``. A resample whose ASR_a is
    0 has no relative reduction and is left out of that interval (their count is reported)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired outcomes need equal, non-zero lengths, got {len(a)} and {len(b)}")
    clusters = list(range(len(a))) if clusters is None else list(clusters)
    if len(clusters) != len(a):
        raise ValueError(f"{len(clusters)} cluster labels for {len(a)} rows")
    groups: dict = {}
    for x, y, c in zip(a, b, clusters):
        groups.setdefault(c, []).append((bool(x), bool(y)))
    keys = list(groups)
    rng = random.Random(seed)
    diffs, cuts, undefined = [], [], 0
    for _ in range(resamples):
        rows = [pair for _ in keys for pair in groups[keys[rng.randrange(len(keys))]]]
        ra, rb = _rates(rows)
        diffs.append(ra - rb)
        if ra > 0:
            cuts.append(1 - rb / ra)
        else:
            undefined += 1
    ra, rb = _rates([(bool(x), bool(y)) for x, y in zip(a, b)])

    def interval(values):
        if not values:
            return None
        values = sorted(values)
        lo = values[int(math.floor((1 - level) / 2 * (len(values) - 1)))]
        hi = values[int(math.ceil((1 + level) / 2 * (len(values) - 1)))]
        return [lo, hi]

    return {
        "asr_a": ra,
        "asr_b": rb,
        "n": len(a),
        "clusters": len(keys),
        "difference": ra - rb,
        "difference_ci": interval(diffs),
        "reduction": (1 - rb / ra) if ra > 0 else None,
        "reduction_ci": interval(cuts),
        "resamples": resamples,
        "resamples_without_reduction": undefined,
        "level": level,
    }


def verdict(reduction_ci: Sequence[float] | None, paper_effect: float) -> str:
    """Three-valued verdict on a claimed relative reduction of ASR by ``paper_effect`` (e.g. 0.9 for "cuts ASR by
    90%"): "reproduced" when the interval excludes zero on the side of a reduction, "not reproduced" when it
    excludes the paper's effect size (all of it below), "inconclusive" otherwise (or without an interval)."""
    if reduction_ci is None:
        return "inconclusive"
    lo, hi = reduction_ci
    if lo > 0:
        return "reproduced" if hi >= paper_effect else "reproduced (a smaller reduction than the paper's)"
    if hi < paper_effect:
        return "not reproduced"
    return "inconclusive"
