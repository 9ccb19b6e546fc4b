"""bft — deep safety alignment through base-favored tokens.

Public API (imported lazily so that `import bft` stays cheap and never pulls transformers or triton
until a name that needs them is used):

- objective: :func:`bft_loss`, :class:`BFTLoss`, :class:`BFTLossOutput`, :func:`hybrid_teacher_logits`,
  :data:`COMPLETION_TERMS` (the names ``bft_loss(completion=...)`` accepts)
- analysis:  :func:`base_favored_tokens`, :class:`BaseFavoredTokens`
- decoding:  :func:`contrastive_logprobs`, :class:`ContrastiveLogitsProcessor`, :func:`contrastive_generate`
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

# public name -> module that defines it
_LAZY = {
    "bft_loss": "bft.loss",
    "BFTLoss": "bft.loss",
    "BFTLossOutput": "bft.loss",
    "COMPLETION_TERMS": "bft.loss",
    "hybrid_teacher_logits": "bft.reference",
    "base_favored_tokens": "bft.reference",
    "BaseFavoredTokens": "bft.reference",
    "contrastive_logprobs": "bft.decoding",
    "ContrastiveLogitsProcessor": "bft.decoding",
    "contrastive_generate": "bft.decoding",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bft' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
