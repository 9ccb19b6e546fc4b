"""bft.eval.utility: the utility measures (perplexity, GSM8K, lm-eval). The deliberation classifier:
test_deliberation.py."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from bft.eval.generation import GenerationSettings, System
from bft.eval.utility import UtilityUnavailable, extract_number, gsm8k_exact_match, perplexity, run_lm_eval
from bft.hf.testing import tiny_llama_pair

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "text,number",
    [
        ("so the answer is 42.", "42"),
        ("#### 1,234", "1234"),
        ("3 then 7.0", "7"),
        ("x #### 5 and later 9", "5"),
        ("no digits", None),
        ("-3.5", "-3.5"),
    ],
)
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
    monkeypatch.setattr(
        System,
        "generate",
        lambda self, inputs, settings, desc=None: [
            tok(next(answers), add_special_tokens=False).input_ids for _ in inputs
        ],
    )
    out = gsm8k_exact_match(system, ["q1", "q2", "q3"], ["#### 12", "8", "3"], GenerationSettings(max_new_tokens=4))
    assert [r["correct"] for r in out["records"]] == [True, False, False] and out["accuracy"] == pytest.approx(1 / 3)


def test_lm_eval_missing_gives_a_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed (it is a dev dependency)
    with pytest.raises(UtilityUnavailable, match="pip install lm-eval"):
        run_lm_eval(None, None, ["arc_challenge"])


def _local_mc_task(folder):
    """A local lm-eval multiple-choice task over a JSON-lines file: runs offline."""
    import json

    docs = [
        {"question": "2 + 2 =", "choices": ["4", "5"], "answer": 0},
        {"question": "The sky is", "choices": ["blue", "green", "loud"], "answer": 0},
        {"question": "Ice is", "choices": ["hot", "cold"], "answer": 1},
    ]
    data = folder / "docs.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (folder / "bft_local_mc.yaml").write_text(
        "task: bft_local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return docs


def test_lm_eval_harness_runs_a_local_task_offline_and_scores_what_the_model_prefers(tmp_path):
    """lm-eval-harness end to end on an in-memory tiny model and a local task (no download): its accuracy equals
    the share of questions whose gold choice has the highest summed log-likelihood, computed here independently."""
    from bft.eval.utility import run_lm_eval
    from bft.hf.testing import tiny_llama, tiny_tokenizer

    docs = _local_mc_task(tmp_path)
    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=0).eval()
    scores = run_lm_eval(model, tok, ["bft_local_mc"], include_path=str(tmp_path), batch_size=2)
    acc = scores["bft_local_mc"]["acc,none"]

    def loglik(context, continuation):
        whole = tok(context + continuation, add_special_tokens=False).input_ids
        n_ctx = len(tok(context, add_special_tokens=False).input_ids)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
        return sum(logp[i - 1, whole[i]].item() for i in range(n_ctx, len(whole)))

    right = 0
    for d in docs:
        context = f"Question: {d['question']}\nAnswer:"
        ll = [loglik(context, " " + c) for c in d["choices"]]
        right += max(range(len(ll)), key=ll.__getitem__) == d["answer"]
    assert acc == pytest.approx(right / len(docs))


def test_lm_eval_through_bft_eval_with_a_local_task(tmp_path):
    """``EvalConfig.lm_eval_tasks`` + ``lm_eval_include_path``: the scores land in the system's utility."""
    from bft.eval.generation import System
    from bft.eval.runner import EvalConfig, run_eval
    from bft.hf.testing import tiny_llama, tiny_tokenizer

    _local_mc_task(tmp_path)
    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=0).eval()
    cfg = EvalConfig(
        prefill_ks=[],
        utility=[],
        judges=[],
        threeway=False,
        likelihood=False,
        lm_eval_tasks=["bft_local_mc"],
        lm_eval_include_path=str(tmp_path),
    )
    res = run_eval([System("tiny", model, tok)], cfg, tmp_path / "out", rows=[{"prompt": "hi", "response": "yo"}])
    lm = res["summary"]["systems"]["tiny"]["utility"]["lm_eval"]
    assert 0.0 <= lm["bft_local_mc"]["acc,none"] <= 1.0
