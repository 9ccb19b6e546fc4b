"""Deprecated alias of :mod:`bft.hf.models` (the Hugging Face layer); kept for one release."""

import sys
import warnings

import bft.hf.models  # noqa: F401

warnings.warn("bft.models is deprecated: import bft.hf.models", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = sys.modules["bft.hf.models"]
