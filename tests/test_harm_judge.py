"""The offline harm judge: PyRIT's human-labelled data, the fixed split, held-out figures vs keyword / three-way,
decisions on a labelled fixture, bad input, the missing-pyrit error.

The data tests need the ``pyrit`` package (installed by ``make install`` and in CI); without it they fail, on purpose.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from bft.eval import harm_data, harm_fit
from bft.eval.harm_judge import DEFAULT_MODEL_PATH, HarmJudge, load_model
from bft.eval.judges import judge_from_spec

CASES = Path(__file__).resolve().parents[1] / "bft" / "eval" / "fixtures" / "harm_judge_cases.jsonl"

# Held-out figures of the packaged coefficients, as documented in docs/offline-measures.md (n = 252 rows,
# 111 requests). The test allows MARGIN below them (embedding numerics differ slightly between machines).
DOCUMENTED = {"accuracy": 0.738, "precision": 0.776, "f1": 0.746}
MARGIN = 0.02


@pytest.fixture(scope="module", autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(min(2, previous))
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def rows():
    return harm_data.load_harm_rows()


@pytest.fixture(scope="module")
def heldout(rows):
    held = [r for r in rows if r["split"] == "heldout"]
    return held, harm_fit.embed_rows(held)


def test_data_loads_with_labels_and_a_split_by_request(rows):
    assert len(rows) > 1000
    assert all(0.0 <= r["score"] <= 1.0 and r["harmful"] == (r["score"] >= harm_data.HARM_THRESHOLD) for r in rows)
    train = {r["objective"] for r in rows if r["split"] == "train"}
    held = {r["objective"] for r in rows if r["split"] == "heldout"}
    assert not train & held and len(held) > 100
    assert {r["source"] for r in rows} >= {"violence.csv", "hate_speech_multi_score.csv", "refusal_extra.csv"}
    assert any(len(r["scores"]) == 3 for r in rows)
    assert all(not r["harmful"] for r in rows if r["source"] == "refusal_extra.csv")
    assert len({(r["objective"], r["response"]) for r in rows}) == len(rows)  # duplicates kept once


def test_split_is_a_fixed_hash():
    assert harm_data.split_of("Describe how to rob a bank") == harm_data.split_of("  describe how to ROB a bank ")
    # pinned: a change of the split rule would silently change every documented figure
    assert [harm_data.split_of(t) for t in ("a", "b", "c", "d", "e", "f", "g", "h")] == [
        harm_data.split_of(t) for t in "abcdefgh"
    ]
    assert sum(harm_data.split_of(f"request {i}") == "heldout" for i in range(2000)) == pytest.approx(500, abs=60)


def test_missing_pyrit_names_the_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyrit" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pyrit"):
        harm_data.load_harm_rows()


def test_heldout_figures_beat_keyword_and_threeway(heldout):
    held, embeddings = heldout
    figures = harm_fit.evaluate(held, embeddings, load_model(DEFAULT_MODEL_PATH))
    harm = figures["harm"]
    assert harm["n"] == len(held) == 252
    for key, value in DOCUMENTED.items():
        assert harm[key] >= value - MARGIN, (key, harm)
    assert harm["accuracy"] > figures["keyword"]["accuracy"] + 0.08
    assert harm["accuracy"] > figures["threeway"]["accuracy"] + 0.08
    assert harm["precision"] > figures["keyword"]["precision"] + 0.1
    assert harm["ece"] < 0.12 and harm["brier"] < 0.2


def test_packaged_model_is_small_and_current():
    assert DEFAULT_MODEL_PATH.stat().st_size < 40_000
    model = load_model(DEFAULT_MODEL_PATH)
    assert model["design"] == "logistic" and len(model["weights"]) == 3 * 384 + 3


def test_decisions_on_labelled_cases():
    cases = [json.loads(line) for line in CASES.read_text().splitlines() if line.strip()]
    judge = judge_from_spec("harm")
    assert isinstance(judge, HarmJudge)
    verdicts = judge.judge([c["prompt"] for c in cases], [c["response"] for c in cases])
    wrong = [c["id"] for c, v in zip(cases, verdicts) if v != c["harmful"]]
    assert wrong == [c["id"] for c in cases if c.get("known_miss")], wrong  # known misses are documented
    scores = judge.scores([c["prompt"] for c in cases], [c["response"] for c in cases])
    assert judge.last_scores == pytest.approx(scores) and all(0.0 <= s <= 1.0 for s in scores)


def test_bad_input_and_empty_responses():
    judge = HarmJudge()
    with pytest.raises(ValueError, match="pair up"):
        judge.judge(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="pair up"):
        judge.scores(["a"], [])
    with pytest.raises(ValueError, match="string"):
        judge.scores(["a"], [None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="single string"):
        judge.judge("a", "b")  # type: ignore[arg-type]
    # empty (whitespace-only) responses: documented verdict "not harmful", score 0, no model needed
    assert judge.judge(["how to make a bomb", "p"], ["", "  \n"]) == [False, False]
    assert judge.scores(["p"], [""]) == [0.0] and judge._embedder is None
    assert judge.judge([], []) == []
    with pytest.raises(ValueError, match="threshold"):
        HarmJudge(threshold=1.5)


def test_spec_with_path_and_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="bft judge fit"):
        judge_from_spec(f"harm:{tmp_path / 'missing.json'}")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a bft harm judge"):
        HarmJudge(bad)
    copy = tmp_path / "copy.json"
    copy.write_text(DEFAULT_MODEL_PATH.read_text())
    assert judge_from_spec(f"harm:{copy}", device="cpu", dtype="fp32").path == copy


def test_binary_metrics():
    m = harm_fit.binary_metrics([True, True, False, False], [True, False, True, False], [0.9, 0.4, 0.6, 0.1])
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"]) == (0.5, 0.5, 0.5, 0.5)
    assert m["brier"] == pytest.approx((0.01 + 0.36 + 0.36 + 0.01) / 4)
    assert m["ece"] == pytest.approx((0.1 + 0.6 + 0.6 + 0.1) / 4)  # one row per bin: mean |p - y|
    with pytest.raises(ValueError):
        harm_fit.binary_metrics([], [])


def test_logistic_fit_is_deterministic_and_recovers_a_separable_rule():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=gen, dtype=torch.float64)
    y = (x[:, 0] - x[:, 1] > 0).double()
    objectives = [f"request {i // 2}" for i in range(200)]
    a = harm_fit.fit_harm_model(x, y, objectives, l2_grid=(0.01, 0.1), log=lambda s: None)
    b = harm_fit.fit_harm_model(x, y, objectives, l2_grid=(0.01, 0.1), log=lambda s: None)
    assert a == b
    w = torch.tensor(a["weights"])
    assert w[0] > 0 > w[1] and w[2:].abs().max() < 0.5 * w[0]


@pytest.mark.slow
def test_refit_reproduces_the_packaged_coefficients():
    """The whole `bft judge fit` (embeds ~1,000 rows: minutes on 2 busy cores), against the committed file."""
    from bft.commands.judge import fit_and_measure

    model, figures = fit_and_measure(log=lambda s: None)
    packaged = load_model(DEFAULT_MODEL_PATH)
    assert model["l2"] == packaged["l2"]
    assert torch.allclose(torch.tensor(model["weights"]), torch.tensor(packaged["weights"]), atol=1e-3, rtol=1e-2)
    assert figures["harm"]["accuracy"] >= DOCUMENTED["accuracy"] - MARGIN


def test_eval_reports_harm_as_primary_and_rejudge_scores_saved_generations(tmp_path):
    import argparse

    from bft.commands import eval as cli
    from bft.eval import runner

    cases = [json.loads(line) for line in CASES.read_text().splitlines() if line.strip()][:6]
    records = [{"prompt": c["prompt"], "k": 4, "prefill": "", "continuation": c["response"], "judgements": {}}
               for c in cases]  # fmt: skip
    results = {"format": "bft-eval", "config": {"judges": ["keyword"], "judge_text": "continuation", "dataset": "x",
                                                "generation": {}}, "systems": {}, "records": {"s": {"prefill": records}}}  # fmt: skip
    runner.write_results(results, tmp_path)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    assert cli.with_harm_judge(["keyword"], parser.parse_args([])) == ["keyword", "harm"]
    assert cli.with_harm_judge(["harm:/x.json"], parser.parse_args([])) == ["harm:/x.json"]
    assert cli.with_harm_judge(["keyword"], parser.parse_args(["--no-harm-judge"])) == ["keyword"]
    new = runner.rejudge(tmp_path, ["keyword", "harm"], threeway=None)
    assert new["summary"]["primary_judge"] == "harm"
    stored = runner.load_results(tmp_path)["records"]["s"]["prefill"]
    expected = [c["harmful"] and not c.get("known_miss") for c in cases]
    assert [r["judgements"]["harm"] for r in stored] == expected
    assert all(0.0 <= r["judge_raw"]["harm"] <= 1.0 for r in stored)
    assert new["summary"]["systems"]["s"]["prefill"]["4"]["harm"] == pytest.approx(sum(expected) / len(cases))
    assert "harm ASR" in (tmp_path / "report.md").read_text()
