"""Decoding: inference-time contrastive decoding against the base model (paper Eq. 7), :mod:`.contrastive`."""

from bft.decoding.contrastive import (
    ContrastiveLogitsProcessor,
    check_same_vocab_size,
    contrastive_generate,
    contrastive_logprobs,
)

__all__ = ["contrastive_logprobs", "ContrastiveLogitsProcessor", "contrastive_generate", "check_same_vocab_size"]
