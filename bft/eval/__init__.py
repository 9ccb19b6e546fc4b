"""Evaluation: attacks, judges and utility (see docs/eval.md).

Names are imported lazily so that ``import bft.eval`` stays cheap (no transformers until needed).
"""

from __future__ import annotations

import importlib

_LAZY = {
    "is_refusal": "bft.eval.judges",
    "normalize_text": "bft.eval.judges",
    "Judge": "bft.eval.judges",
    "JudgeResult": "bft.eval.judges",
    "KeywordJudge": "bft.eval.judges",
    "judge_from_spec": "bft.eval.judges",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bft.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
