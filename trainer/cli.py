"""Deprecated alias of :mod:`bft.commands.train` (the ``bft train`` verb); kept for one release."""

import warnings

from bft.commands.train import DESCRIPTION, add_arguments, run  # noqa: F401

warnings.warn("bft.trainer.cli is deprecated: the command lives in bft.commands.train", DeprecationWarning,
              stacklevel=2)  # fmt: skip
