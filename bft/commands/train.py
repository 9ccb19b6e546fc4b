"""``bft train CONFIG [--max-steps N] [--output-dir DIR] [--resume] [key.sub=value ...]``.

The arguments are defined in :mod:`bft.trainer.config` (``python trainer/train.py`` parses the same ones there);
this module imports :mod:`bft.trainer.train` to run, and nothing imports this module but the ``bft`` console.
"""

from __future__ import annotations

import argparse

from bft.trainer.config import TRAIN_DESCRIPTION as DESCRIPTION
from bft.trainer.config import add_train_arguments as add_arguments

__all__ = ["DESCRIPTION", "add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    from bft.trainer.train import run_from_arguments

    return run_from_arguments(args)
