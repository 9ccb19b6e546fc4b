"""Deprecated alias of :mod:`bft.commands.judge` (the ``bft judge`` verb); kept for one release."""

import sys
import warnings

import bft.commands.judge  # noqa: F401

warnings.warn("bft.eval.judge_cli is deprecated: the command lives in bft.commands.judge", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = sys.modules["bft.commands.judge"]
