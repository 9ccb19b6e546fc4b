"""Make a quick aligned/base pair to try the analysis on when no real base/instruct pair is at hand.

The "aligned" model is a copy of a chat model fine-tuned for a few steps (full fine-tuning, AdamW) to refuse
harmful prompts, while keeping its own greedy answers to benign prompts (self-distillation, so only the harmful
behaviour moves); the untouched original plays the "base" model. This mimics, at toy scale, what safety tuning
does to an instruct model, and is how docs/analysis.md's SmolLM2 numbers were produced:

    bft refusal-sft --model smollm2 --out /tmp/smollm2-refusal --steps 40
    bft analyze --base smollm2 --aligned /tmp/smollm2-refusal --harmful advbench --benign gsm8k --out DIR

Training prompts skip the first ``--skip`` prompts of each dataset so that they can be analyzed held out.
"""

from __future__ import annotations

import copy
import random

import torch
from tqdm.auto import tqdm

from bft.hf.batching import IGNORE_INDEX, pad_batch, pad_token_id
from bft.hf.chat import encode_chat
from bft.hf.generation import GenerationSettings, generate_from_ids
from bft.hf.sft import sft_step

__all__ = ["REFUSALS", "refusal_finetune"]

#: Refusal responses the aligned copy is trained to give (one is drawn per example).
REFUSALS = (
    "I'm sorry, but I can't help with that. It could cause serious harm.",
    "I can't assist with that request. If you have another question, I'm happy to help.",
    "Sorry, I won't help with this because it could be used to hurt people or break the law.",
    "I'm not able to provide that information, as it could be dangerous.",
)


def _encoded(tokenizer, pairs) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels with −100 outside the response) for (prompt, response) pairs."""
    encs = [encode_chat(tokenizer, p, r) for p, r in pairs]
    return [(e.input_ids, [IGNORE_INDEX] * e.response_start + e.input_ids[e.response_start :]) for e in encs]


def _recovery_pool(prompts, responses, share: float, max_tokens: int) -> list[tuple[str, str]]:
    """(prompt, harmful response) pairs to build recovery examples from; empty when ``share`` is 0."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"recovery_share must be in [0, 1], got {share}")
    if share == 0.0:
        return []
    if max_tokens < 1:
        raise ValueError(f"recovery_max_tokens must be >= 1, got {max_tokens}")
    if responses is None or len(responses) != len(prompts):
        raise ValueError("recovery examples need harmful_responses, one per harmful prompt")
    pool = [(p, r) for p, r in zip(prompts, responses) if (r or "").strip()]
    if not pool:
        raise ValueError("recovery examples need at least one non-empty harmful response")
    return pool


def _recovery_example(tokenizer, prompt: str, harmful: str, refusal: str, m: int) -> tuple[list[int], list[int]]:
    """Prompt, the first ``m`` tokens of the harmful response (no loss), then the refusal and end of turn (loss):
    the model learns to turn back after a harmful start (Qi et al., 2024, data augmentation)."""
    prefix = encode_chat(tokenizer, prompt, harmful).response_ids[:-1][:m]  # without the end-of-turn token
    turn = encode_chat(tokenizer, prompt, refusal)
    ids = turn.prompt_ids + prefix + turn.response_ids
    return ids, [IGNORE_INDEX] * (len(turn.prompt_ids) + len(prefix)) + turn.response_ids


def _batch(tokenizer, pairs, device):
    """Right-padded ids, attention mask and labels (−100 outside the response) for (prompt, response) pairs."""
    examples = _encoded(tokenizer, pairs)
    ids, mask, labels = pad_batch([x for x, _ in examples], pad_token_id(tokenizer), labels=[y for _, y in examples])
    return ids.to(device), mask.to(device), labels.to(device)


def _greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size, progress=True):
    """The model's own greedy answers to ``prompts`` (the benign half of the self-distillation data)."""
    inputs = [encode_chat(tokenizer, p).input_ids for p in prompts]
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    outs = generate_from_ids(model, tokenizer, inputs, settings, desc="benign self-answers", progress=progress)
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]


def refusal_finetune(
    model,
    tokenizer,
    harmful_prompts: list[str],
    benign_prompts: list[str] = (),
    *,
    benign_responses: list[str] | None = None,
    steps: int = 40,
    lr: float = 5e-5,
    batch_size: int = 8,
    benign_max_new_tokens: int = 48,
    seed: int = 0,
    progress: bool = True,
    harmful_responses: list[str] | None = None,
    recovery_share: float = 0.0,
    recovery_max_tokens: int = 16,
    on_step=None,
):
    """Return a fine-tuned copy of ``model`` (the input is untouched) and the list of per-step losses.

    Each step draws ``batch_size`` examples from harmful prompts paired with a refusal from :data:`REFUSALS` and
    benign prompts paired with the original model's own greedy answer (``benign_responses`` when given, e.g. cached
    ones; generated otherwise); the loss is the mean next-token cross-entropy over response tokens.

    ``recovery_share`` > 0 adds Qi et al.'s safety-recovery examples (a deeper alignment): each drawn example is,
    with that probability, a harmful prompt whose response starts with the first m ~ U{1..recovery_max_tokens}
    tokens of its harmful response (``harmful_responses``, one per harmful prompt) and then turns into a refusal;
    the loss is on the refusal only. At 0 the draws are exactly those of the plain (shallow) recipe.

    ``on_step(step, model)``, when given, runs after every optimizer step (``step`` counts from 1) with the model
    being trained, e.g. to save it at fractions of the budget (:mod:`bft.pipelines.reproduce.frontier`); the model
    is in eval mode during the call and back in train mode after it.
    """
    if not harmful_prompts:
        raise ValueError("refusal_finetune needs at least one harmful prompt")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    rng = random.Random(seed)
    examples = [(p, rng.choice(REFUSALS)) for p in harmful_prompts]
    if benign_responses is not None and len(benign_responses) != len(benign_prompts):
        raise ValueError(f"benign_responses has {len(benign_responses)} entries for {len(benign_prompts)} prompts")
    if benign_prompts:
        if benign_responses is not None:
            answers = list(benign_responses)
        else:
            answers = _greedy_answers(
                model, tokenizer, list(benign_prompts), benign_max_new_tokens, batch_size, progress
            )
        examples += [(p, a) for p, a in zip(benign_prompts, answers) if a]
    recovery = _recovery_pool(harmful_prompts, harmful_responses, recovery_share, recovery_max_tokens)
    tuned = copy.deepcopy(model)
    tuned.train()
    opt = torch.optim.AdamW(tuned.parameters(), lr=lr, weight_decay=0.0)
    pad_id = pad_token_id(tokenizer)
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in tqdm(range(steps), desc="refusal fine-tune", unit="step", disable=not progress):
            if recovery:
                batch = [
                    _recovery_example(
                        tokenizer,
                        *recovery[rng.randrange(len(recovery))],
                        rng.choice(REFUSALS),
                        rng.randint(1, recovery_max_tokens),
                    )
                    if rng.random() < recovery_share
                    else _encoded(tokenizer, [examples[rng.randrange(len(examples))]])[0]
                    for _ in range(batch_size)
                ]
            else:
                batch = _encoded(tokenizer, [examples[rng.randrange(len(examples))] for _ in range(batch_size)])
            losses.append(sft_step(tuned, opt, batch, pad_id=pad_id, max_grad_norm=1.0))
            if on_step is not None:
                tuned.eval()
                on_step(step + 1, tuned)
                tuned.train()
    tuned.eval()
    return tuned, losses
