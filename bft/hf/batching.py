"""Batching token ids: the pad id, padding, attention masks, position ids and stop ids — one helper per job.

Every place in bft that turns lists of token ids into a batch goes through these, so that padding side, pad id
fallback and position-id convention cannot drift apart between training, generation, scoring and analysis.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bft.hf.chat import end_of_turn_id

__all__ = ["IGNORE_INDEX", "eos_token_ids", "pad_token_id", "pad_batch", "position_ids", "stop_token_ids"]

IGNORE_INDEX = -100  # label of positions that carry no loss (prompt tokens, padding), as in Hugging Face


def _first_id(value) -> int | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)


def pad_token_id(tokenizer, model=None) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its eos token, else the model's generation
    config pad token. Padding is always masked out, so which id fills it never changes a result."""
    generation_config = getattr(model, "generation_config", None)
    for candidate in (
        getattr(tokenizer, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        getattr(generation_config, "pad_token_id", None),
    ):
        value = _first_id(candidate)
        if value is not None:
            return value
    raise ValueError("the tokenizer has neither a pad nor an eos token: set tokenizer.pad_token")


def pad_batch(
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    *,
    side: str = "right",
    labels: Sequence[Sequence[int]] | None = None,
    label_pad: int = IGNORE_INDEX,
):
    """Pad id lists into ``(input_ids, attention_mask)`` [B, L] int64, or ``(input_ids, attention_mask, labels)``
    when ``labels`` (one list per sequence, at most as long as it; shorter lists are padded with ``label_pad``)
    are given. ``side="left"`` puts the tokens at the right, as generation needs; training pads on the right."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not sequences or any(len(ids) == 0 for ids in sequences):
        raise ValueError("every input must contain at least one token")
    if labels is not None and len(labels) != len(sequences):
        raise ValueError(f"{len(labels)} label lists for {len(sequences)} sequences")
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    label_ids = torch.full((len(sequences), width), int(label_pad), dtype=torch.long) if labels is not None else None
    for row, ids in enumerate(sequences):
        start = width - len(ids) if side == "left" else 0
        input_ids[row, start : start + len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        mask[row, start : start + len(ids)] = 1
        if label_ids is not None:
            if len(labels[row]) > len(ids):
                raise ValueError(f"labels[{row}] has {len(labels[row])} ids for a sequence of {len(ids)}")
            label_ids[row, start : start + len(labels[row])] = torch.as_tensor(list(labels[row]), dtype=torch.long)
    return (input_ids, mask) if label_ids is None else (input_ids, mask, label_ids)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a padded batch, the way ``generate`` builds them: cumsum(mask) − 1 on real tokens, 1 on
    pads (never attended to), so a sequence gets the same positions whatever padding surrounds it."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end an assistant turn: the chat template's end-of-turn token and every eos id."""
    ids = set()
    try:
        ids.add(end_of_turn_id(tokenizer))
    except ValueError:
        pass
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in eos if isinstance(eos, (list, tuple)) else [eos, getattr(tokenizer, "eos_token_id", None)]:
        if e is not None:
            ids.add(int(e))
    return sorted(ids)


def eos_token_ids(tokenizer, model=None) -> set[int]:
    """Every end-of-sequence id of the model's generation config and of the tokenizer (what ``generate`` stops
    on when no ``eos_token_id`` is passed)."""
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        e = getattr(source, "eos_token_id", None)
        if e is None:
            continue
        ids.update(int(x) for x in (e if isinstance(e, (list, tuple)) else [e]))
    return ids
