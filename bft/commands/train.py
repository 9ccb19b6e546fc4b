"""``bft train CONFIG [--max-steps N] [--output-dir DIR] [--resume] [--engine bft|trl] [key.sub=value ...]``.

The arguments are defined in :mod:`bft.trainer.config` (``python trainer/train.py`` parses the same ones there);
this module runs the configured engine — bft's loop (:mod:`bft.trainer.train`) or TRL's trainer
(:mod:`bft.integrations.trl`, ``pip install 'bft[trl]'``) — and nothing imports it but the ``bft`` console.
"""

from __future__ import annotations

import argparse
import importlib.util

from bft.trainer.config import TRAIN_DESCRIPTION as DESCRIPTION
from bft.trainer.config import add_train_arguments as add_arguments

__all__ = ["DESCRIPTION", "add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    from bft.trainer.config import config_from_train_arguments

    engine = config_from_train_arguments(args).train.engine  # validated: names the valid engines when unknown
    if engine == "trl":
        if importlib.util.find_spec("trl") is None:
            raise ModuleNotFoundError("--engine trl needs TRL: pip install 'bft[trl]'", name="trl")
        from bft.integrations.trl import run_from_arguments
    else:
        from bft.trainer.train import run_from_arguments
    return run_from_arguments(args)
