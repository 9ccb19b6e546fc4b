"""Utility measures and the deliberation classifier."""

from __future__ import annotations

import math

import pytest
import torch

from bft.eval.deliberation import deliberation_table, reasons_about_safety
from bft.eval.generation import GenerationSettings, System
from bft.eval.utility import UtilityUnavailable, extract_number, gsm8k_exact_match, perplexity, run_lm_eval
from bft.hf.testing import tiny_llama_pair


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("text,number", [("so the answer is 42.", "42"), ("#### 1,234", "1234"), ("3 then 7.0", "7"),
                                         ("x #### 5 and later 9", "5"), ("no digits", None), ("-3.5", "-3.5")])
def test_extract_number(text, number):
    assert extract_number(text) == number


def test_perplexity_matches_manual_teacher_forcing():
    from bft.hf.chat import encode_chat

    base, aligned, tok = tiny_llama_pair()
    system = System("baseline", aligned, tok)
    out = perplexity(system, ["What is 2+2?", "Name a color"], ["4", "Blue, like the sky."])
    total, count = 0.0, 0
    for p, r in [("What is 2+2?", "4"), ("Name a color", "Blue, like the sky.")]:
        enc = encode_chat(tok, p, r)
        ids = enc.input_ids[:-1]  # continuation without the end-of-turn token
        with torch.no_grad():
            logp = aligned(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        for t in range(enc.response_start, len(ids)):
            total += float(logp[t - 1, ids[t]])
            count += 1
    assert out["tokens"] == count
    assert out["perplexity"] == pytest.approx(math.exp(-total / count), rel=1e-4)
    contrastive = perplexity(System("c", aligned, tok, base_model=base, alpha=1.0), ["What is 2+2?"], ["4"])
    assert contrastive["perplexity"] != pytest.approx(perplexity(system, ["What is 2+2?"], ["4"])["perplexity"])
    with pytest.raises(ValueError):
        perplexity(system, ["x"], [""])


def test_gsm8k_exact_match_scores_generations(monkeypatch):
    _, aligned, tok = tiny_llama_pair()
    system = System("baseline", aligned, tok)
    answers = iter(["so #### 12", "I think 7", "nothing"])
    monkeypatch.setattr(System, "generate", lambda self, inputs, settings, desc=None: [
        tok(next(answers), add_special_tokens=False).input_ids for _ in inputs])
    out = gsm8k_exact_match(system, ["q1", "q2", "q3"], ["#### 12", "8", "3"], GenerationSettings(max_new_tokens=4))
    assert [r["correct"] for r in out["records"]] == [True, False, False] and out["accuracy"] == pytest.approx(1 / 3)


def test_lm_eval_skips_with_clear_message():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        with pytest.raises(UtilityUnavailable, match="pip install lm-eval"):
            run_lm_eval(None, None, ["arc_challenge"])
    else:
        pytest.skip("lm-eval installed; offline behaviour not testable here")


def test_reasons_about_safety():
    assert reasons_about_safety("Sure, step 1... However, this is illegal and could cause serious harm.")
    assert reasons_about_safety("<think>Is this dangerous? yes</think> I cannot help.")
    assert not reasons_about_safety("Step 1: take the flour. Step 2: add water.")
    assert not reasons_about_safety("I'm sorry, I can't help with that.")


def test_deliberation_table():
    table = deliberation_table(["It is illegal, but here", "Step 1", "That is dangerous. I won't.", "No."],
                               [True, True, False, False])
    assert (table["harmful+reasoning"], table["harmful+no_reasoning"], table["safe+reasoning"],
            table["safe+no_reasoning"]) == (1, 1, 1, 1)
    assert table["total_harmful"] == 2 and table["share_reasoning"] == 0.5
    with pytest.raises(ValueError):
        deliberation_table(["a"], [])
