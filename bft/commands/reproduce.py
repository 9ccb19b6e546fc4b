"""``bft reproduce``: the paper in miniature on a real model, offline (analysis, attacks, BFT; cached stages)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bft.pipelines.reproduce import ReproduceConfig, quick_config, reproduce, validate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="output folder (default runs/reproduce, runs/demo for --quick)")
    parser.add_argument("--quick", action="store_true", help="small sizes: ~10 min on 2 CPU cores (the demo)")
    parser.add_argument("--model", help="base chat model: alias, hub id or local path (default smollm2, offline)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: CUDA when available)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--n-train", type=int, help="harmful training prompts")
    parser.add_argument("--n-test", type=int, help="held-out harmful prompts")
    parser.add_argument("--align-steps", type=int, help="steps of the shallow refusal SFT")
    parser.add_argument("--bft-steps", type=int, help="BFT training steps")
    parser.add_argument("--bft-lr", type=float)
    parser.add_argument("--eval-tokens", type=int, help="new tokens per attacked continuation")
    parser.add_argument("--prefill-ks", help="comma-separated prefill lengths, e.g. 0,4,10,20")
    parser.add_argument("--alphas", help="comma-separated α of the contrastive sweep")
    parser.add_argument("--batch-size", type=int)


def config_from_args(args) -> ReproduceConfig:
    overrides = {}
    for name in ("model", "device", "seed", "n_train", "n_test", "align_steps", "bft_steps", "bft_lr", "eval_tokens",
                 "batch_size"):  # fmt: skip
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if getattr(args, "prefill_ks", None):
        overrides["prefill_ks"] = [int(k) for k in args.prefill_ks.split(",") if k.strip()]
    if getattr(args, "alphas", None):
        overrides["alphas"] = [float(a) for a in args.alphas.split(",") if a.strip()]
    quick = bool(getattr(args, "quick", False))
    overrides["out"] = args.out or ("runs/demo" if quick else "runs/reproduce")
    cfg = quick_config(**overrides) if quick else ReproduceConfig(**overrides)
    validate(cfg)
    return cfg




def run(args) -> int:
    cfg = config_from_args(args)
    print(f"bft reproduce: {'quick' if cfg.quick else 'default'} mode, output in {cfg.out}", file=sys.stderr)
    summary = reproduce(cfg)
    print((Path(cfg.out) / "REPORT.md").read_text())
    print(f"Report: {Path(cfg.out) / 'REPORT.md'}; plots in {Path(cfg.out) / 'plots'}, "
          f"{Path(cfg.out) / 'analysis_aligned'} and {Path(cfg.out) / 'eval'}; numbers in {Path(cfg.out) / 'summary.json'} "
          f"(this invocation {summary['environment']['elapsed_min']} min)")  # fmt: skip
    return 0
