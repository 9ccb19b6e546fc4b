"""Deprecated alias of :mod:`bft.commands.eval` (the ``bft eval`` verb); kept for one release."""

import sys
import warnings

import bft.commands.eval  # noqa: F401

warnings.warn("bft.eval.cli is deprecated: the command lives in bft.commands.eval", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = sys.modules["bft.commands.eval"]
