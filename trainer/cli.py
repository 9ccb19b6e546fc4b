"""``bft train CONFIG [--max-steps N] [--output-dir DIR] [--resume] [key.sub=value ...]``."""

from __future__ import annotations

import argparse

from bft.trainer.config import accept_overrides_anywhere

DESCRIPTION = (
    "Train a student with the BFT objective (paper Eq. 8-14) from a YAML config. CONFIG is a file or the name of a "
    "bundled config (tiny-cpu, smollm2-135m, llama-3.1-8b-lora, llama-3.1-8b-full, qwen-2.5-7b-lora). Writes "
    "DIR/metrics.jsonl, checkpoints in DIR/checkpoints/ and the final student in DIR/final/."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file, or a bundled config name such as tiny-cpu")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. optim.lr=2e-5 finetune.mode=full data.batch_size=4")  # fmt: skip
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides train.max_steps)")
    parser.add_argument("--output-dir", default=None, help="output directory (overrides train.output_dir)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in the output directory")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    accept_overrides_anywhere(parser)


def run(args: argparse.Namespace) -> int:
    from bft.trainer.config import load_config, validate
    from bft.trainer.train import train

    config = load_config(args.config, args.overrides)
    if args.max_steps is not None:
        config.train.max_steps = args.max_steps
    if args.output_dir is not None:
        config.train.output_dir = args.output_dir
    validate(config)
    summary = train(config, resume=args.resume, progress=not args.no_progress)
    print(f"trained {summary['steps']} steps; metrics: {summary['output_dir']}/metrics.jsonl; "
          f"student: {summary['final_dir']}")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python trainer/train.py ...`` / ``accelerate launch trainer/train.py ...``: the same as ``bft train``."""
    parser = argparse.ArgumentParser(prog="python trainer/train.py", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
