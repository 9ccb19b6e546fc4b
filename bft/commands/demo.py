"""``bft demo``: the quick miniature reproduction of the paper (:mod:`bft.pipelines.reproduce` with ``--quick``)."""

from __future__ import annotations

import argparse

from bft.commands.reproduce import run as run_reproduce


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo; reruns reuse its cache)")
    parser.add_argument("--device", help="cpu, cuda (default: CUDA when available)")


def run(args) -> int:
    args.quick = True
    return run_reproduce(args)
