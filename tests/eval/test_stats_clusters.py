"""bft.eval.stats with the prompt as the unit: the MIN_EVENTS rule, the cluster interval of a pooled rate, the exact
sign test over prompts and the bound on it that row-level McNemar counts allow."""

import math
import random

import pytest

from bft.eval.stats import (
    MIN_EVENTS,
    cluster_wilson_interval,
    enough_events,
    mcnemar_exact,
    paired_reduction,
    sign_test_bound,
    sign_test_over_prompts,
    verdict,
    wilson_interval,
)


def test_min_events_is_ten_and_decides_between_9_and_10():
    assert MIN_EVENTS == 10
    assert not enough_events(9) and enough_events(10) and not enough_events(None)
    assert verdict([0.5, 1.0], 0.48, events=9) == "inconclusive"
    assert verdict([0.5, 1.0], 0.48, events=10) == "reproduced"
    assert verdict([0.1, 0.2], 0.48, events=10) == "reproduced (a smaller reduction than the paper's)"
    assert verdict([-0.2, 0.1], 0.9, events=9) == "inconclusive"  # would be "not reproduced" with enough events
    assert verdict([-0.2, 0.1], 0.9, events=10) == "not reproduced"
    assert verdict([1.0, 1.0], 0.96) == "inconclusive"  # no event count: no verdict
    assert verdict([1.0, 1.0], 0.96, events=9.4) == "inconclusive"  # a rate x rows rounds to 9
    assert verdict([1.0, 1.0], 0.96, events=9.6) == "reproduced"


def _duplicated(rate_prompts: int, prompts: int, seeds: int):
    """Each prompt's outcome repeated over its seeds (seeds perfectly correlated)."""
    outcomes = [i < rate_prompts for i in range(prompts) for _ in range(seeds)]
    clusters = [i for i in range(prompts) for _ in range(seeds)]
    return outcomes, clusters


def test_cluster_interval_is_wider_than_the_row_interval_on_duplicated_seeds():
    outcomes, clusters = _duplicated(12, 40, 3)
    got = cluster_wilson_interval(outcomes, clusters)
    rows = wilson_interval(sum(outcomes), len(outcomes))
    prompts = wilson_interval(12, 40)
    assert got["rows"] == 120 and got["clusters"] == 40 and got["rate"] == pytest.approx(0.3)
    assert got["design_effect"] > 2.9  # ~3: three copies of one observation
    lo, hi = got["ci"]
    assert lo < rows[0] and hi > rows[1]  # wider than the row-level Wilson interval
    assert hi - lo >= (prompts[1] - prompts[0]) - 1e-9  # at least as wide as one row per prompt
    assert hi - lo == pytest.approx(prompts[1] - prompts[0], rel=0.05)


def test_cluster_interval_without_correlation_is_the_row_interval():
    # every prompt: exactly one success in three seeds -> no between-prompt variance, design effect floored at 1
    outcomes = [s == 0 for _ in range(40) for s in range(3)]
    clusters = [i for i in range(40) for _ in range(3)]
    got = cluster_wilson_interval(outcomes, clusters)
    assert got["design_effect"] == 1.0
    assert got["ci"] == pytest.approx(list(wilson_interval(40, 120)))
    # one row per prompt: the Wilson interval
    assert cluster_wilson_interval([True] * 3 + [False] * 7)["ci"] == pytest.approx(list(wilson_interval(3, 10)))


def test_cluster_interval_at_zero_is_the_wilson_interval_at_the_prompt_count():
    got = cluster_wilson_interval([False] * 600, [i // 3 for i in range(600)])
    assert got["design_effect"] == 3.0
    assert got["ci"] == pytest.approx(list(wilson_interval(0, 200)))
    assert got["ci"][1] > wilson_interval(0, 600)[1]


def test_sign_test_known_cases():
    # all ties: nothing to test
    t = sign_test_over_prompts([True, False, True], [True, False, True], ["a", "b", "c"])
    assert (t["positive"], t["negative"], t["ties"], t["p_value"]) == (0, 0, 3, 1.0)
    # ten prompts, each with the reference ahead on two of three seeds: p = 2 / 2**10
    a = [True, True, False] * 10
    b = [False, False, False] * 10
    clusters = [i for i in range(10) for _ in range(3)]
    t = sign_test_over_prompts(a, b, clusters)
    assert (t["positive"], t["negative"], t["clusters"], t["rows"]) == (10, 0, 10, 30)
    assert t["p_value"] == pytest.approx(2 / 2**10)
    # within one prompt a win and a loss cancel: a tie, not two discordant pairs
    t = sign_test_over_prompts([True, False], [False, True], [0, 0])
    assert t["ties"] == 1 and t["p_value"] == 1.0
    # rows counted as independent would call the 30-row case far more significant than the 10 prompts allow
    assert mcnemar_exact(a, b)["p_value"] < t["p_value"] and mcnemar_exact(a, b)["p_value"] < 2 / 2**10


def test_sign_test_at_one_seed_is_mcnemar_and_is_exact_and_order_free():
    rng = random.Random(3)
    a = [rng.random() < 0.5 for _ in range(80)]
    b = [rng.random() < 0.3 for _ in range(80)]
    assert sign_test_over_prompts(a, b)["p_value"] == pytest.approx(mcnemar_exact(a, b)["p_value"])
    clusters = [i // 4 for i in range(80)]
    first = sign_test_over_prompts(a, b, clusters)
    order = list(range(80))
    rng.shuffle(order)
    again = sign_test_over_prompts([a[i] for i in order], [b[i] for i in order], [clusters[i] for i in order])
    assert first == again == sign_test_over_prompts(a, b, clusters)  # exact: no resampling, no seed
    pos, neg = first["positive"], first["negative"]
    expected = min(1.0, 2 * sum(math.comb(pos + neg, i) for i in range(min(pos, neg) + 1)) / 2 ** (pos + neg))
    assert first["p_value"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="equal lengths"):
        sign_test_over_prompts([True], [True, False])


def test_sign_test_bound_holds_for_every_arrangement_and_is_mcnemar_at_one_seed():
    assert sign_test_bound(5, 1, 64, 1)["p_value_bound"] == pytest.approx(
        mcnemar_exact([True] * 5 + [False], [False] * 5 + [True])["p_value"]
    )
    rng = random.Random(0)
    for trial in range(300):
        prompts, seeds = rng.randint(2, 30), rng.randint(1, 4)
        pa, pb = rng.random(), rng.random()
        clusters = [i for i in range(prompts) for _ in range(seeds)]
        a = [rng.random() < pa for _ in clusters]
        b = [rng.random() < pb for _ in clusters]
        mc = mcnemar_exact(a, b)
        actual = sign_test_over_prompts(a, b, clusters)["p_value"]
        bound = sign_test_bound(mc["n10"], mc["n01"], prompts, seeds)["p_value_bound"]
        assert actual <= bound + 1e-12, (trial, actual, bound)
    # the committed case: Qi 0 vs the student's 20 harmful rows over 200 prompts x 3 seeds is prompt-level p <= 1/64
    assert sign_test_bound(0, 20, 200, 3)["p_value_bound"] == pytest.approx(2 / 2**7)


def test_paired_reduction_is_seeded():
    rng = random.Random(1)
    a = [rng.random() < 0.6 for _ in range(90)]
    b = [rng.random() < 0.4 for _ in range(90)]
    clusters = [i // 3 for i in range(90)]
    assert paired_reduction(a, b, clusters, seed=5) == paired_reduction(a, b, clusters, seed=5)
    assert paired_reduction(a, b, clusters, seed=5)["clusters"] == 30


def test_cluster_wilson_bound_contains_every_pooled_interval_and_is_reached():
    from bft.eval.stats import cluster_wilson_bound

    rng = random.Random(0)
    prompts, seeds = 16, 2
    clusters = [c for c in range(prompts) for _ in range(seeds)]
    for _ in range(300):  # outcomes laid out over the prompts in every way: the bound holds each time
        outcomes = [rng.random() < rng.choice((0.1, 0.5, 0.9)) for _ in clusters]
        pooled = cluster_wilson_interval(outcomes, clusters)
        lo, hi = cluster_wilson_bound(pooled["rate"], prompts)
        assert lo <= pooled["ci"][0] + 1e-12 and pooled["ci"][1] <= hi + 1e-12
    # the worst case (the seeds of a prompt always agree) reaches it, so it is no wider than it has to be
    agree = [c < 6 for c in clusters]
    assert cluster_wilson_interval(agree, clusters)["ci"] == pytest.approx(cluster_wilson_bound(6 / 16, prompts))
    # at 0 or 1 there is nothing to estimate: the Wilson interval at the number of prompts
    assert cluster_wilson_bound(1.0, 64) == pytest.approx(list(wilson_interval(64, 64)))
    for bad in ((0.5, 1), (1.2, 10), (-0.1, 10)):
        with pytest.raises(ValueError, match="cluster|rate"):
            cluster_wilson_bound(*bad)
