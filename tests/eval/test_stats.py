"""bft.eval.stats: Wilson intervals, the exact McNemar test, the paired bootstrap and the three-valued verdict."""

import math

import pytest

from bft.eval.stats import mcnemar_exact, paired_reduction, verdict, wilson_interval


def test_wilson_known_values():
    lo, hi = wilson_interval(8, 10)  # textbook value: (0.4902, 0.9433)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = wilson_interval(0, 20)  # never negative, and not degenerate at 0
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    assert wilson_interval(20, 20)[1] == 1.0
    with pytest.raises(ValueError, match="n >= 1"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 4)


def test_mcnemar_exact_matches_the_binomial():
    a = [True] * 10 + [False] * 5 + [True] * 3
    b = [False] * 10 + [True] * 5 + [True] * 3  # n10 = 10, n01 = 5
    got = mcnemar_exact(a, b)
    expected = min(1.0, 2 * sum(math.comb(15, i) for i in range(6)) / 2**15)
    assert (got["n10"], got["n01"]) == (10, 5) and got["p_value"] == pytest.approx(expected)
    assert mcnemar_exact([True, False], [True, False])["p_value"] == 1.0  # no discordant pairs
    with pytest.raises(ValueError, match="equal lengths"):
        mcnemar_exact([True], [True, False])


def test_paired_reduction_is_deterministic_and_brackets_the_estimate():
    a = [True] * 40 + [False] * 10
    b = [True] * 10 + [False] * 40
    clusters = [i // 2 for i in range(50)]  # two seeds per prompt
    r = paired_reduction(a, b, clusters, resamples=500, seed=1)
    assert r == paired_reduction(a, b, clusters, resamples=500, seed=1)
    assert r["asr_a"] == 0.8 and r["asr_b"] == 0.2 and r["reduction"] == pytest.approx(0.75)
    lo, hi = r["reduction_ci"]
    assert lo < 0.75 < hi and lo > 0
    assert r["clusters"] == 25
    assert verdict(r["reduction_ci"], 0.5, events=sum(a)) == "reproduced"


def test_verdict_three_values():
    assert verdict([0.1, 0.95], 0.9, events=10) == "reproduced"
    assert verdict([0.1, 0.4], 0.9, events=10).startswith("reproduced (a smaller")
    assert verdict([-0.3, 0.4], 0.9, events=10) == "not reproduced"
    assert verdict([-0.3, 0.95], 0.9, events=10) == "inconclusive"
    assert verdict(None, 0.9, events=10) == "inconclusive"


def test_no_effect_at_small_n_is_inconclusive():
    a = [True, False] * 8
    b = [False, True] * 8
    r = paired_reduction(a, b, resamples=400)
    assert verdict(r["reduction_ci"], 0.5, events=10) == "inconclusive"  # the interval decides, not the count
