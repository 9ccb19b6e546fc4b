"""The `bft` command line.

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only for the subcommand that runs, so ``bft --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "analyze": ("bft.commands.analyze", "position-wise base-favored token analysis of an aligned/base pair (JSON + plots)"),
    "generate": ("bft.commands.generate", "generate with contrastive decoding against the base model (paper Eq. 7)"),
    "train": ("bft.trainer.cli", "train a student with the BFT objective from a YAML config"),
    "eval": ("bft.eval.cli", "prefill / fine-tuning / GCG attacks, judges and utility; JSON + Markdown + plots"),
    "reproduce": ("bft.commands.reproduce", "the paper in miniature on a real model, offline: analysis, attacks, BFT (cached)"),
    "demo": ("bft.commands.demo", "the quick reproduction (~10 min on 2 CPU cores): table, plots, report"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bft", description="Deep safety alignment through base-favored tokens (analysis, decoding, training, eval)."
    )
    from bft import __version__

    parser.add_argument("--version", action="version", version=f"bft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if argv and argv[0] == name:  # only the chosen subcommand pays for its imports
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
