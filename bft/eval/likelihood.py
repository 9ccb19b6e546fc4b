"""Judge-free harmfulness measure: how likely a system finds a reference harmful continuation.

For a harmful prompt x (optionally followed by an attacker's prefill p in the assistant turn) and a reference
harmful continuation y = (y_1 … y_T) — the base model's own reply, or a dataset target — teacher forcing gives

    log π(y_t | x, p, y_<t)      for t = 1 … T

and the measure is their mean (per sequence, then over prompts) and their profile over positions t. Lower means
the system puts less probability on producing the harmful text, i.e. it is safer. No judge is involved, the number
is deterministic and it is comparable across systems that share a tokenizer (the same tokens are scored).

For contrastive decoding the distribution is the adjusted one of Eq. 7, renormalised:

    log π̃(· | …) = log_softmax(ℓ_a − α · 1_B · (ℓ_b − ℓ_a)),   B = {v : π_base(v) > π_aligned(v)}

with ℓ_a, ℓ_b the aligned and base log-probabilities (log_softmax of the logits, so a constant shift of either
model's logits changes nothing) at that position; the penalised scores come from
:func:`bft.decoding.contrastive_logprobs`, the function contrastive generation uses, and are renormalised here.
α = 0 is the aligned model itself.

Numerics: logits are computed in fp32 whatever the model dtype. For decoder families whose output layer is a plain
linear head (Llama, Mistral, Qwen, Phi-3, Gemma-1, …) the final hidden states are projected with an fp32 copy of the
head (in vocabulary chunks, so no fp32 copy of the whole head is ever held), which avoids the bf16 rounding of
``model(...).logits``; other models (soft-capped or scaled logits, quantised or LoRA-wrapped heads) use
``model(...).logits.float()``. log_softmax always runs in fp32.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from bft.decoding import check_same_vocab_size, contrastive_logprobs
from bft.decoding.contrastive import check_form
from bft.hf.batching import pad_batch, pad_token_id, position_ids
from bft.hf.chat import prompt_text
from bft.hf.models import final_hidden_states, lm_head_weight

__all__ = ["continuation_logprobs", "summarize_logprobs"]

# Model families whose logits are exactly ``lm_head(final_hidden_state)`` (no soft-capping, no logit scale), so the
# head can be applied in fp32 by us. Anything else goes through ``model(...).logits``.
_PLAIN_HEAD_MODEL_TYPES = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "gemma", "olmo", "olmo2"}
)
# Vocabulary rows projected at once by the fp32 head: bounds the transient fp32 weight copy (32768 × 4096 × 4 B =
# 512 MiB for a Llama-3-8B head).
_HEAD_CHUNK_ROWS = 32768


def _as_list(name: str, value, n: int | None = None) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list of strings, got {type(value).__name__}")
    items = list(value)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ValueError(f"{name}[{i}] must be a string, got {type(item).__name__}")
    if n is not None and len(items) != n:
        raise ValueError(f"{name} has {len(items)} entries but prompts has {n}")
    return items


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # a parameter-less wrapper: nothing better to go on
        return torch.device("cpu")


def _output_vocab_size(model) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dim() == 2:
        return int(weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if size is not None else None


def _plain_head_weight(model) -> torch.Tensor | None:
    """``W`` with ``logits == final_hidden_states(model) @ W.T`` exactly, or None when that is not known to hold.

    Only for allow-listed families (no soft-capping / logit scale, no bias on the head); ``bft.hf.models.lm_head_weight``
    unwraps peft models and refuses LoRA-wrapped or quantised heads (then the model's own forward is used).
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in _PLAIN_HEAD_MODEL_TYPES:
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "bias", None) is not None:
        return None
    try:
        return lm_head_weight(model)
    except ValueError:
        return None


def _fp32_logits_at(model, input_ids, attention_mask, position_ids, rows, cols) -> torch.Tensor:
    """fp32 logits [len(rows), V] at (rows[i], cols[i]) of the padded batch."""
    weight = _plain_head_weight(model)
    if weight is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return out.logits[rows, cols].float()
    hidden = final_hidden_states(model, input_ids, attention_mask, position_ids=position_ids)
    hidden = hidden[rows, cols].float()
    pieces = []
    for start in range(0, weight.shape[0], _HEAD_CHUNK_ROWS):
        chunk = weight[start : start + _HEAD_CHUNK_ROWS].to(device=hidden.device, dtype=torch.float32)
        pieces.append(hidden @ chunk.T)
    return torch.cat(pieces, dim=-1)


@contextlib.contextmanager
def _eval_mode(*models):
    """Dropout off while scoring (determinism); the callers' train/eval flags are restored afterwards."""
    flags = [(m, m.training) for m in models if m is not None]
    try:
        for m, _ in flags:
            m.eval()
        yield
    finally:
        for m, was_training in flags:
            m.train(was_training)


def continuation_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    base_model=None,
    alpha: float | None = None,
    batch_size: int = 8,
    prefill: str | Sequence[str] | None = None,
    system: str | None = None,
    top_k: int | None = None,
    form: str = "logprobs",
    progress: bool | None = None,
) -> list[torch.Tensor]:
    """Per-token log-probabilities of each continuation under teacher forcing.

    For prompt i the context is ``bft.hf.chat.prompt_text(tokenizer, prompts[i], system=system, prefill=prefill_i)``
    tokenized without added special tokens (the chat template supplies them), and the continuation is
    ``tokenizer(continuations[i], add_special_tokens=False)`` appended right after it (no end-of-turn token: the
    continuation is a fragment of the reply). Returns, for each i, an fp32 CPU tensor of shape [T_i] holding
    log π(y_t | context, y_<t) for the T_i continuation tokens.

    Plain scoring uses ``log_softmax(ℓ_a)``. With ``base_model`` and ``alpha`` (contrastive decoding) it uses
    Eq. 7 renormalised, ``log_softmax(ℓ_a − α·1_B·(ℓ_b − ℓ_a))`` via :func:`bft.decoding.contrastive_logprobs`;
    both models see the same token ids, so they must share a vocabulary.

    Batches of ``batch_size`` sequences (grouped by length to limit padding) are padded on
    ``tokenizer.padding_side`` with explicit position ids, so each result is independent of which other sequences
    share its batch (up to float round-off). Dropout is disabled while scoring; the models' modes are restored.

    Args:
        prefill: None, one string for every prompt, or one string per prompt (e.g. the attack's first k target
            tokens); scored as context, not as part of the continuation.
        system: optional system prompt for the chat template.
        top_k: contrastive only — penalise only base-favored tokens among the top-k of ℓ_b − ℓ_a (Algorithm 1),
            as ``contrastive_generate(..., top_k=...)`` does; None penalises all of B.
        form: contrastive only — Eq. 7 on log-probs (default) or on raw logits (the paper's text), as
            ``contrastive_generate(..., form=...)``.
        progress: show a tqdm bar (None: only on a terminal).
    """
    prompts = _as_list("prompts", prompts)
    n = len(prompts)
    continuations = _as_list("continuations", continuations, n)
    prefills = _prefills(prefill, n)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    _check_contrastive(model, base_model, alpha, top_k)
    check_form(form)
    encoded = _encode(tokenizer, prompts, continuations, prefills, system, _output_vocab_size(model))
    pad_id = pad_token_id(tokenizer, model)
    side = "left" if getattr(tokenizer, "padding_side", "right") == "left" else "right"
    # Longest first: similar lengths share a batch (less padding) and memory peaks on the first batch.
    order = sorted(range(n), key=lambda i: (-(len(encoded[i][0]) + len(encoded[i][1])), i))
    batches = [order[s : s + batch_size] for s in range(0, n, batch_size)]
    results: list[torch.Tensor | None] = [None] * n
    with _eval_mode(model, base_model), torch.inference_mode():
        for batch in tqdm(batches, desc="scoring continuations", disable=None if progress is None else not progress):
            picked = _score_batch(model, base_model, alpha, top_k, form, [encoded[i] for i in batch], pad_id, side)
            start = 0
            for i in batch:
                size = len(encoded[i][1])
                results[i] = picked[start : start + size].clone()
                start += size
    return results  # type: ignore[return-value]


def _prefills(prefill, n: int) -> list[str]:
    if prefill is None:
        return [""] * n
    if isinstance(prefill, str):
        return [prefill] * n
    return _as_list("prefill", prefill, n)


def _check_contrastive(model, base_model, alpha, top_k) -> None:
    if (base_model is None) != (alpha is None):
        raise ValueError(
            "contrastive scoring needs both base_model and alpha (got only "
            f"{'base_model' if base_model is not None else 'alpha'}); pass neither for plain scoring"
        )
    if base_model is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        # the same guard contrastive_generate uses: equal heads, or one a padded copy of the other
        check_same_vocab_size(model, base_model)
    elif top_k is not None:
        raise ValueError("top_k only applies to contrastive scoring (give base_model and alpha)")


def _encode(tokenizer, prompts, continuations, prefills, system, vocab) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per prompt, checked: a non-empty continuation, ids inside the vocabulary."""
    encoded = []  # (context ids, continuation ids)
    for i in range(len(prompts)):
        context = list(
            tokenizer(
                prompt_text(tokenizer, prompts[i], system=system, prefill=prefills[i]), add_special_tokens=False
            ).input_ids
        )
        target = list(tokenizer(continuations[i], add_special_tokens=False).input_ids)
        if not target:
            raise ValueError(f"continuations[{i}] is empty after tokenization ({continuations[i]!r}); nothing to score")
        if vocab is not None and max(context + target) >= vocab:
            raise ValueError(
                f"sequence {i} has token id {max(context + target)} but the model's vocabulary has {vocab} entries: "
                "the tokenizer does not belong to this model"
            )
        encoded.append((context, target))
    return encoded


def _score_batch(model, base_model, alpha, top_k, form, pairs, pad_id: int, side: str) -> torch.Tensor:
    """Log-probs of every continuation token of one batch of (context, continuation) id pairs, concatenated."""
    ids, mask = pad_batch([context + target for context, target in pairs], pad_id, side=side)
    rows, cols, targets = [], [], []
    for r, (context, target) in enumerate(pairs):
        offset = ids.shape[1] - len(context) - len(target) if side == "left" else 0
        # the logits at position j predict token j + 1: rows for the continuation start one token early
        first = offset + len(context) - 1
        rows += [r] * len(target)
        cols += list(range(first, first + len(target)))
        targets += target
    positions = position_ids(mask)
    rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
    device = _model_device(model)
    logits = _fp32_logits_at(
        model, ids.to(device), mask.to(device), positions.to(device), rows_t.to(device), cols_t.to(device)
    )
    if base_model is not None:
        base_device = _model_device(base_model)
        base_logits = _fp32_logits_at(
            base_model,
            ids.to(base_device),
            mask.to(base_device),
            positions.to(base_device),
            rows_t.to(base_device),
            cols_t.to(base_device),
        ).to(logits.device)
        # a padded head on one side: like contrastive_generate, decode over the shared width only (the
        # extra columns are not real tokens and have no counterpart in the other model)
        shared = min(logits.shape[-1], base_logits.shape[-1])
        if max(targets) >= shared:
            raise ValueError(f"token id {max(targets)} is beyond the vocabulary the two models share ({shared} rows)")
        logits, base_logits = logits[:, :shared], base_logits[:, :shared]
        # contrastive_logprobs gives the penalised scores of Eq. 7 (what decoding ranks); they do not sum
        # to one, so renormalise: scoring needs the distribution contrastive sampling draws from.
        adjusted = contrastive_logprobs(logits, base_logits, float(alpha), top_k=top_k, form=form)
        logprobs = torch.log_softmax(adjusted.float(), dim=-1)
    else:
        logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs.gather(-1, torch.tensor(targets, device=logprobs.device)[:, None])[:, 0].cpu()


def summarize_logprobs(logprobs: Sequence[torch.Tensor]) -> dict:
    """Summary of :func:`continuation_logprobs` output.

    Returns ``{"mean": mean over sequences of each sequence's mean log-prob, "token_mean": mean over all tokens,
    "by_position": [mean over the sequences that have position i, for i = 0 … max T − 1], "n": #sequences}``.
    ``mean`` weighs every prompt equally; ``token_mean`` weighs long continuations more. fp64 accumulation.
    """
    if isinstance(logprobs, torch.Tensor) or not isinstance(logprobs, Sequence):
        raise ValueError(f"logprobs must be a list of 1-D tensors, got {type(logprobs).__name__}")
    if len(logprobs) == 0:
        raise ValueError("logprobs is empty: nothing to summarize")
    seqs = []
    for i, t in enumerate(logprobs):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.numel() == 0:
            raise ValueError(f"logprobs[{i}] must be a non-empty 1-D tensor, got {t!r:.80}")
        t = t.detach().to("cpu", torch.float64)
        if not torch.isfinite(t).all():
            # -inf is possible in principle (a token with zero probability); the mean would hide which one
            raise ValueError(f"logprobs[{i}] has non-finite values: {t.tolist()[:8]}")
        seqs.append(t)
    longest = max(t.numel() for t in seqs)
    sums = torch.zeros(longest, dtype=torch.float64)
    counts = torch.zeros(longest, dtype=torch.float64)
    for t in seqs:
        sums[: t.numel()] += t
        counts[: t.numel()] += 1
    return {
        "mean": float(torch.stack([t.mean() for t in seqs]).mean()),
        "token_mean": float(sums.sum() / counts.sum()),
        "by_position": (sums / counts).tolist(),
        "n": len(seqs),
    }
