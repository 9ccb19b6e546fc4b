"""Deprecated alias of :mod:`bft.hf.data` (the Hugging Face layer); kept for one release."""

import sys
import warnings

import bft.hf.data  # noqa: F401

warnings.warn("bft.data is deprecated: import bft.hf.data", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = sys.modules["bft.hf.data"]
