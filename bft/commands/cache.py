"""``bft cache CONFIG [--out DIR] [--rebuild] [key.sub=value ...]``: build the exact frozen-teacher cache of a
training config (:mod:`bft.trainer.cache`)."""

from __future__ import annotations

import argparse
import sys

from bft.config import accept_overrides
from bft.trainer.cache import DESCRIPTION, CacheError, build
from bft.trainer.config import load_config, validate

__all__ = ["DESCRIPTION", "add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.add_argument("config", help="YAML config file, or a bundled config name such as tiny-cpu")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.max_length=1024")
    parser.add_argument("--out", default=None, help="cache folder (overrides teacher_cache.path)")
    parser.add_argument("--rebuild", action="store_true", help="replace a cache built for other inputs")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    accept_overrides(parser)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.out is not None:
        config.teacher_cache.path = args.out
    validate(config)
    try:
        build(config, rebuild=args.rebuild, progress=not args.no_progress)
    except CacheError as e:
        print(f"bft cache: {e}", file=sys.stderr)
        return 2
    return 0
