"""Deprecated alias of :mod:`bft.hf.chat` (the Hugging Face layer); kept for one release."""

import sys
import warnings

import bft.hf.chat  # noqa: F401

warnings.warn("bft.chat is deprecated: import bft.hf.chat", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = sys.modules["bft.hf.chat"]
