"""``bft refusal-sft``: fine-tune a copy of a chat model to refuse (a toy aligned/base pair)."""

from __future__ import annotations

import argparse
import os
import sys

from bft.hf.data import read_prompts
from bft.hf.models import load_model_and_tokenizer, save_pretrained
from bft.pipelines.refusal_sft import refusal_finetune


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="the chat model to copy (also the 'base' of the pair)")
    p.add_argument("--out", required=True, help="folder for the fine-tuned copy (save_pretrained + tokenizer)")
    p.add_argument("--harmful", default="advbench", help="harmful prompts: dataset name, path, or .txt")
    p.add_argument("--benign", default="gsm8k", help="benign prompts: dataset name, path, or .txt ('' for none)")
    p.add_argument("--skip", type=int, default=20, help="leave the first N prompts of each dataset out of training")
    p.add_argument("--n-train", type=int, default=64, help="training prompts per dataset")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)


def run(args) -> int:
    model, tok = load_model_and_tokenizer(args.model, device=args.device)
    harmful = [r["prompt"] for r in read_prompts(args.harmful, limit=args.skip + args.n_train)][args.skip :]
    benign = (
        [r["prompt"] for r in read_prompts(args.benign, limit=args.skip + args.n_train)][args.skip :]
        if args.benign
        else []
    )
    tuned, losses = refusal_finetune(
        model, tok, harmful, benign, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed
    )
    os.makedirs(args.out, exist_ok=True)
    save_pretrained(tuned, args.out, tokenizer=tok)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps; saved to {args.out}", file=sys.stderr)
    return 0
