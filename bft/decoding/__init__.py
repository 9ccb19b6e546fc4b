"""Decoding: inference-time contrastive decoding against the base model (paper Eq. 7), :mod:`.contrastive`."""

from bft.decoding.contrastive import (
    FORMS,
    ContrastiveLogitsProcessor,
    check_same_vocab_size,
    contrastive_generate,
    contrastive_logprobs,
)

__all__ = [
    "FORMS",
    "contrastive_logprobs",
    "ContrastiveLogitsProcessor",
    "contrastive_generate",
    "check_same_vocab_size",
]
