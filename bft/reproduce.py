"""Deprecated alias of :mod:`bft.pipelines.reproduce` (the command is :mod:`bft.commands.reproduce`); kept for one
release."""

import warnings

from bft.commands.reproduce import add_arguments, config_from_args, run  # noqa: F401
from bft.pipelines.reproduce import ReproduceConfig, quick_config, reproduce, validate  # noqa: F401
from bft.pipelines.reproduce.stages import bft_train_config  # noqa: F401

__all__ = ["ReproduceConfig", "reproduce", "quick_config", "add_arguments", "run"]

warnings.warn("bft.reproduce is deprecated: import bft.pipelines.reproduce", DeprecationWarning, stacklevel=2)
