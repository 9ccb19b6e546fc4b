"""The `bft` command line.

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only for the subcommand that runs, so ``bft --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "analyze": (
        "bft.commands.analyze",
        "position-wise base-favored token analysis of an aligned/base pair (JSON + plots)",
    ),
    "generate": ("bft.commands.generate", "generate with contrastive decoding against the base model (paper Eq. 7)"),
    "train": ("bft.commands.train", "train a student with the BFT objective from a YAML config"),
    "cache": ("bft.commands.cache", "build the exact frozen-teacher cache of a training config (train with one model)"),
    "judge": ("bft.commands.judge", "fit the offline harm judge on human labels (PyRIT) and measure it held-out"),
    "eval": ("bft.commands.eval", "prefill / fine-tuning / GCG attacks, judges and utility; JSON + Markdown + plots"),
    "reproduce": (
        "bft.commands.reproduce",
        "the paper in miniature on a real model, offline: analysis, attacks, BFT (cached)",
    ),
    "refusal-sft": ("bft.commands.refusal_sft", "fine-tune a copy of a chat model to refuse (a toy aligned/base pair)"),
    "demo": ("bft.commands.demo", "the quick reproduction (~10 min on 2 CPU cores): table, plots, report"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bft",
        description="Deep safety alignment through base-favored tokens (analysis, decoding, training, eval).",
    )
    from bft import __version__

    parser.add_argument("--version", action="version", version=f"bft {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback of an error (also BFT_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if argv and argv[0] == name:  # only the chosen subcommand pays for its imports
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors propagate as exceptions (the programmatic entry point, used by the tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


#: Exceptions that mean "the input is wrong" (a bad config value, a missing file, a missing optional package):
#: the console prints their message on one line and exits with status 2, like argparse does for bad flags.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    ModuleNotFoundError,
)


def console_main(argv: list[str] | None = None) -> int:
    """The ``bft`` command: :func:`main`, with user errors as one line on stderr and exit status 2.

    ``--debug`` (anywhere on the line) or ``BFT_DEBUG=1`` shows the full traceback instead. Anything else (a bug)
    always shows its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("BFT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    command = next((a for a in argv if not a.startswith("-")), None)
    prog = f"bft {command}" if command in COMMANDS else "bft"
    try:
        return main(argv)
    except USER_ERRORS as error:
        if debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__  # one line, whatever the message held
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(console_main())
