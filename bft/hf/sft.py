"""The one supervised fine-tuning step: next-token cross-entropy on response tokens, mean over the step's tokens.

Used by the refusal SFT that makes the reproduction's aligned model and by the fine-tuning attack of ``bft eval``
(the BFT trainer has its own objective). Examples are ``(input_ids, labels)`` lists with ``IGNORE_INDEX`` outside
the response.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bft.hf.batching import IGNORE_INDEX, pad_batch

__all__ = ["response_token_count", "sft_step"]


def response_token_count(examples: Sequence[tuple[list[int], list[int]]]) -> int:
    """Tokens that carry loss once labels are shifted by one (the first label never has a prediction)."""
    return sum(sum(1 for y in labels[1:] if y != IGNORE_INDEX) for _, labels in examples)


def sft_step(
    model,
    optimizer,
    examples: Sequence[tuple[list[int], list[int]]],
    *,
    pad_id: int,
    micro_batch_size: int | None = None,
    max_grad_norm: float | None = None,
) -> float:
    """One optimizer step on ``examples``; returns the loss, mean over the step's response tokens.

    loss = Σ_{examples} Σ_{t: label_t ≠ IGNORE} −log π(label_t | ids_<t) / #response tokens

    With ``micro_batch_size`` smaller than the batch the gradient accumulates over micro-batches, each scaled by
    the whole step's token count (transformers' ``num_items_in_batch``), so the step equals one full batch.
    ``max_grad_norm`` clips the gradient norm over the optimizer's parameters before the step.
    """
    device = next(model.parameters()).device
    size = micro_batch_size or len(examples)
    chunks = [examples[m : m + size] for m in range(0, len(examples), size)]
    n_tokens = response_token_count(examples)
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for chunk in chunks:
        ids, mask, labels = pad_batch([x for x, _ in chunk], pad_id, labels=[y for _, y in chunk])
        extra = {} if len(chunks) == 1 else {"num_items_in_batch": n_tokens}
        loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device), **extra).loss
        loss.backward()
        total += float(loss.detach())
    if max_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return total
