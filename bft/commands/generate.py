"""``bft generate``: generate with contrastive decoding against the base model (paper Eq. 7)."""

from __future__ import annotations

import argparse
import json
import sys

import torch
from tqdm.auto import tqdm

from bft.atomic import atomic_write_jsonl
from bft.decoding import FORMS, contrastive_generate
from bft.hf.chat import render_prompts
from bft.hf.data import read_prompts, response_prefixes
from bft.hf.models import load_pair

HELP = "generate with contrastive decoding against the base model (paper Eq. 7)"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--aligned/--base/--gguf-file/--base-gguf-file/--device, shared with ``bft analyze``."""
    parser.add_argument("--aligned", required=True, help="aligned model: hub id, local path, .gguf, or 'smollm2'")
    parser.add_argument("--base", required=True, help="base model: hub id, local path, .gguf, or 'smollm2'")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside the --aligned folder")
    parser.add_argument("--base-gguf-file", default=None, help="GGUF file name inside the --base folder")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:0 ... (default: cuda if available)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--alpha", type=float, default=1.0, help="penalty strength α of Eq. 7 (0 = plain decoding)")
    parser.add_argument(
        "--form",
        choices=FORMS,
        default="logprobs",
        help="Eq. 7 on log-probs (default) or on raw logits (the paper's text)",
    )
    parser.add_argument("--prompts", required=True, help="text file (one prompt per line), dataset name or path")
    parser.add_argument("--prefill", default="", help="response prefix forced before generation (prefill attack)")
    parser.add_argument(
        "--prefill-from-data",
        type=int,
        default=0,
        metavar="N",
        help="use the first N words of each dataset response as the prefill (e.g. AdvBench targets)",
    )
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first-n", type=int, default=None, help="penalize only the first N generated positions")
    parser.add_argument("--top-k", type=int, default=None, help="penalize only the top-k base-favored tokens")
    parser.add_argument("--system", default=None, help="system prompt for the chat template")
    parser.add_argument("--out", default=None, help="write results as JSON lines here (default: stdout)")


def run(args) -> int:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    rows = read_prompts(args.prompts, limit=args.limit)
    prefills = response_prefixes(rows, args.prefill, args.prefill_from_data)
    aligned_model, base_model, tokenizer = load_pair(
        args.aligned, args.base, gguf_file=args.gguf_file, base_gguf_file=args.base_gguf_file, device=args.device
    )
    torch.manual_seed(args.seed)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=bool(args.sample), pad_token_id=tokenizer.pad_token_id)
    if args.sample:
        gen.update(temperature=args.temperature, top_p=args.top_p)
    records = []
    for i in tqdm(range(0, len(rows), args.batch_size), desc="contrastive generate", unit="batch"):
        chunk = rows[i : i + args.batch_size]
        ids, mask = render_prompts(
            tokenizer, [r["prompt"] for r in chunk], prefills[i : i + args.batch_size], system=args.system
        )
        out = contrastive_generate(
            aligned_model,
            base_model,
            ids,
            mask,
            alpha=args.alpha,
            first_n=args.first_n,
            favored_top_k=args.top_k,
            form=args.form,
            **gen,
        )
        new = out[:, ids.shape[1] :]
        for r, p, seq in zip(chunk, prefills[i : i + args.batch_size], new):
            text = tokenizer.decode(seq, skip_special_tokens=True)
            records.append(
                {"prompt": r["prompt"], "prefill": p, "response": text, "alpha": args.alpha, "form": args.form}
            )
    if args.out:
        atomic_write_jsonl(args.out, records)
        print(f"wrote {len(records)} generations to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return 0
