"""Utility (capability) measures: do safety interventions keep the model useful? (paper Tables 1, 3, 4)

Built in and offline:

* :func:`perplexity` — PPL = exp(−(1/T) Σ_i Σ_t log π(y_{i,t} | x_i, y_{i,<t})) over all T response tokens of benign
  (prompt, response) pairs, teacher-forced through the chat template; for contrastive decoding π is the Eq. 7
  distribution (renormalised), via :func:`bft.eval.likelihood.continuation_logprobs`. Lower is better.
* :func:`gsm8k_exact_match` — greedy answer to GSM8K-style word problems; the prediction is the number after the
  last "####" if present, else the last number in the answer; exact match against the reference number
  (commas and trailing ".0" ignored).

Optional: :func:`run_lm_eval` runs lm-eval-harness tasks (MMLU, ARC-C, BoolQ, HellaSwag, Winogrande, GSM8K,
ToxiGen, TruthfulQA, ...) on an in-memory model; it raises :class:`UtilityUnavailable` with the reason when
``lm_eval`` is not installed or its datasets cannot be fetched (offline).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from bft.eval.generation import GenerationSettings, System
from bft.eval.likelihood import continuation_logprobs

__all__ = [
    "UtilityUnavailable",
    "perplexity",
    "extract_number",
    "gsm8k_exact_match",
    "run_lm_eval",
    "GSM8K_INSTRUCTION",
]

GSM8K_INSTRUCTION = "Solve the problem. Think step by step, then give the final answer as a number after '####'.\n\n"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


class UtilityUnavailable(RuntimeError):
    """An optional utility measure cannot run here (missing package, no network); the message says why."""


def perplexity(system: System, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int = 8) -> dict:
    """``{"perplexity": exp(−token-mean log-prob), "mean_logprob": token mean, "tokens": T, "n": N}``."""
    pairs = [(p, r) for p, r in zip(prompts, responses) if (r or "").strip()]
    if not pairs:
        raise ValueError("perplexity needs benign prompts with non-empty responses")
    logprobs = continuation_logprobs(
        system.model,
        system.tokenizer,
        [p for p, _ in pairs],
        [r for _, r in pairs],
        base_model=system.base_model,
        alpha=system.alpha,
        batch_size=batch_size,
        system=system.system_prompt,
        form=system.form,
    )
    total = sum(float(t.double().sum()) for t in logprobs)
    tokens = sum(int(t.numel()) for t in logprobs)
    mean = total / tokens
    return {"perplexity": math.exp(-mean), "mean_logprob": mean, "tokens": tokens, "n": len(pairs)}


def extract_number(text: str) -> str | None:
    """The answer number in ``text``: after the last '####' if any, else the last number; normalised
    ("1,234.0" -> "1234"). None when there is no number."""
    if text is None:
        return None
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    return _normalise_number(found[0] if "####" in text else found[-1])


def _normalise_number(s: str) -> str:
    s = s.replace(",", "").strip()
    try:
        value = float(s)
    except ValueError:
        return s
    return str(int(value)) if value == int(value) else repr(value)


def gsm8k_exact_match(
    system: System,
    questions: Sequence[str],
    answers: Sequence[str],
    settings: GenerationSettings | None = None,
    *,
    instruction: str = GSM8K_INSTRUCTION,
) -> dict:
    """Exact-match accuracy on GSM8K-style problems. ``answers`` may be a bare number or a GSM8K solution ending
    in "#### N". Returns ``{"accuracy", "n", "records": [{question, answer, generation, predicted, correct}]}``."""
    questions, answers = list(questions), [str(a) for a in answers]
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    if not questions:
        raise ValueError("gsm8k_exact_match needs at least one problem")
    settings = settings or GenerationSettings(max_new_tokens=256)
    inputs = [system.prompt_ids(instruction + q) for q in questions]
    outs = system.generate(inputs, settings, desc=f"gsm8k {system.name}")
    records = []
    for q, a, out in zip(questions, answers, outs):
        text = system.decode(out)
        gold, pred = extract_number(a), extract_number(text)
        records.append(
            {
                "question": q,
                "answer": a,
                "generation": text,
                "predicted": pred,
                "correct": pred is not None and pred == gold,
            }
        )
    return {"accuracy": sum(r["correct"] for r in records) / len(records), "n": len(records), "records": records}


def run_lm_eval(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    include_path: str | None = None,
) -> dict:
    """lm-eval-harness on an in-memory HF model: ``{task: {metric: value}}``.

    ``include_path``: a folder of task YAML files (lm-eval's ``TaskManager(include_path=...)``), e.g. a local task
    over a JSON-lines file, which runs offline. Raises :class:`UtilityUnavailable` when ``lm_eval`` is not installed
    (``pip install lm-eval``) or a task's data cannot be loaded (offline). Contrastive decoding is not supported here
    (lm-eval scores plain models).
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise UtilityUnavailable(
            f"lm-eval-harness is not installed ({exc}); `pip install lm-eval` to run {list(tasks)}"
        ) from exc
    try:
        from lm_eval.tasks import TaskManager

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        manager = TaskManager(include_path=str(include_path)) if include_path else None
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager)
    except Exception as exc:  # dataset downloads fail offline with many exception types
        raise UtilityUnavailable(f"lm-eval-harness could not run {list(tasks)}: {type(exc).__name__}: {exc}") from exc
    results = out.get("results", {}) if isinstance(out, dict) else {}
    return {
        task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for task, metrics in results.items()
    }
