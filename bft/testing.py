"""Deprecated alias of :mod:`bft.hf.testing` (the Hugging Face layer); kept for one release."""

import sys
import warnings

import bft.hf.testing  # noqa: F401

warnings.warn("bft.testing is deprecated: import bft.hf.testing", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = sys.modules["bft.hf.testing"]
