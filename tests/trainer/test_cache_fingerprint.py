"""bft.trainer.cache_fingerprint: which loss settings make a teacher cache stale (top_k, the selection rule) and
which do not (kl_weight, the completion term)."""

from __future__ import annotations

from helpers import FakeTokenizer


def test_teacher_cache_fingerprint_ignores_kl_weight():
    """The cache holds frozen-model states and top-k ids only: changing kl_weight must not make it stale."""
    from bft.trainer import cache
    from bft.trainer.config import load_config

    one = cache.fingerprint(load_config("tiny-cpu"), FakeTokenizer(), [], [])
    zero = cache.fingerprint(load_config("tiny-cpu", ["loss.kl_weight=0"]), FakeTokenizer(), [], [])
    assert one == zero
    assert not any("kl_weight" in key for key in one)


def test_the_teacher_cache_fingerprint_names_the_rule():
    from bft.trainer import cache
    from bft.trainer.config import load_config

    def fp(*overrides):
        return cache.fingerprint(load_config("tiny-cpu", list(overrides)), FakeTokenizer(), [], [])

    assert "loss.selection" not in fp() and fp() == fp("loss.selection_top_p=0.5")  # "vocab" reads no p
    topp = fp("loss.selection=base_topp", "loss.selection_top_p=0.5")
    assert cache.fingerprint_differences(fp(), topp) == [
        'loss.selection: cache null vs config "base_topp"',
        "loss.selection_top_p: cache null vs config 0.5",
    ]
    assert cache.fingerprint_differences(topp, fp("loss.selection=base_topp")) == [
        "loss.selection_top_p: cache 0.5 vs config 0.9"
    ]


def test_teacher_cache_fingerprint_depends_on_top_k_but_not_the_completion_term():
    """The cache stores TopK(b − a) ids and risk: a cache built under one completion term serves the others, one
    built with another k does not."""
    from bft.trainer import cache
    from bft.trainer.config import load_config

    def fp(*overrides):
        return cache.fingerprint(load_config("tiny-cpu", list(overrides)), FakeTokenizer(), [], [])

    assert fp() == fp("loss.completion=mass") == fp("loss.completion=unlikelihood", "loss.l2_reg=0")
    assert cache.fingerprint_differences(fp(), fp("loss.top_k=12")) == ["loss.top_k: cache 10 vs config 12"]


def test_a_local_data_file_is_identified_by_its_content_not_its_path(tmp_path):
    """A run folder copied elsewhere with its data and its cache keeps the cache; other data does not."""
    from bft.trainer import cache
    from bft.trainer.config import load_config

    rows = '{"prompt": "p", "response": "r"}\n'
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "harmful.jsonl").write_text(rows)
    (tmp_path / "c.jsonl").write_text(rows.replace('"r"', '"other"'))

    def fp(path):
        return cache.fingerprint(load_config("tiny-cpu", [f"data.harmful={path}"]), FakeTokenizer(), [], [])

    assert fp(tmp_path / "a/harmful.jsonl") == fp(tmp_path / "b/harmful.jsonl")
    assert cache.fingerprint_differences(fp(tmp_path / "a/harmful.jsonl"), fp(tmp_path / "c.jsonl"))[0].startswith(
        "data.harmful: cache "
    )
    assert fp("some/hub-dataset")["data.harmful"]["source"] == "some/hub-dataset"
