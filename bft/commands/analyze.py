"""``bft analyze``: position-wise base-favored token analysis of an aligned/base pair (JSON + plots)."""

from __future__ import annotations

import argparse
import sys

from bft.analysis import analyze_pair, write_analysis
from bft.commands.generate import add_model_arguments
from bft.hf.data import read_prompts, response_prefixes
from bft.hf.models import load_pair


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--harmful", required=True, help="harmful prompts: dataset name (advbench...), path, or .txt")
    parser.add_argument("--benign", default=None, help="benign prompts: dataset name (gsm8k, dolly...), path, or .txt")
    parser.add_argument("--out", required=True, help="output folder for analysis.json and the PNG plots")
    parser.add_argument("--limit", type=int, default=20, help="prompts per group (default 20)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--alpha",
        type=float,
        default=1.0,
        help="contrastive decoding strength for the Fig. 3 run on harmful prompts (0 = skip it)",
    )
    parser.add_argument("--prefill", default="", help="adversarial response prefix for harmful prompts")
    parser.add_argument(
        "--prefill-from-data",
        type=int,
        default=0,
        metavar="N",
        help="prefill each harmful prompt with the first N words of its dataset response "
        "(AdvBench targets: 'Sure, here is ...')",
    )
    parser.add_argument("--top-n", type=int, default=100, help="size of the top-n sets (overlap, counts); paper: 100")
    parser.add_argument(
        "--top-k",
        type=int,
        default=10,
        help="Algorithm 1's k: top-k ids of base − aligned logits recorded per position",
    )
    parser.add_argument("--system", default=None, help="system prompt for the chat template")
    parser.add_argument("--no-plots", action="store_true")


def run(args) -> int:
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    harmful = read_prompts(args.harmful, limit=args.limit)
    groups = {
        "harmful": [
            {"prompt": r["prompt"], "prefill": p}
            for r, p in zip(harmful, response_prefixes(harmful, args.prefill, args.prefill_from_data))
        ]
    }
    if args.benign:
        groups["benign"] = [{"prompt": r["prompt"], "prefill": ""} for r in read_prompts(args.benign, limit=args.limit)]
    aligned_model, base_model, tokenizer = load_pair(
        args.aligned, args.base, gguf_file=args.gguf_file, base_gguf_file=args.base_gguf_file, device=args.device
    )
    result = analyze_pair(
        aligned_model,
        base_model,
        tokenizer,
        groups,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        alpha=args.alpha,
        top_n=args.top_n,
        top_k=args.top_k,
        system=args.system,
    )
    result["config"].update(
        aligned=args.aligned,
        base=args.base,
        harmful=args.harmful,
        benign=args.benign,
        prefill=args.prefill,
        prefill_from_data=args.prefill_from_data,
    )
    written = write_analysis(result, args.out, plots=not args.no_plots)
    for key, entry in result["summary"].items():
        print(
            f"{key:22s} prompts={entry['prompts']:3d}  KL early/late = {_fmt(entry['kl_early_mean'])}/"
            f"{_fmt(entry['kl_late_mean'])}  base-favored in top-{args.top_n} early/late = "
            f"{_fmt(entry['bf_count_top_early_mean'])}/{_fmt(entry['bf_count_top_late_mean'])}",
            file=sys.stderr,
        )
    print(f"wrote {written['json']} and {len(written['plots'])} plots", file=sys.stderr)
    return 0


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"
