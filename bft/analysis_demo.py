"""Make a quick aligned/base pair to try the analysis on when no real base/instruct pair is at hand.

The "aligned" model is a copy of a chat model fine-tuned for a few steps (full fine-tuning, AdamW) to refuse
harmful prompts, while keeping its own greedy answers to benign prompts (self-distillation, so only the harmful
behaviour moves); the untouched original plays the "base" model. This mimics, at toy scale, what safety tuning
does to an instruct model, and is how docs/analysis.md's SmolLM2 numbers were produced:

    python -m bft.analysis_demo --model smollm2 --out /tmp/smollm2-refusal --steps 40
    bft analyze --base smollm2 --aligned /tmp/smollm2-refusal --harmful advbench --benign gsm8k --out DIR

Training prompts skip the first ``--skip`` prompts of each dataset so that they can be analyzed held out.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys

import torch

__all__ = ["REFUSALS", "refusal_finetune", "main"]

#: Refusal responses the aligned copy is trained to give (one is drawn per example).
REFUSALS = (
    "I'm sorry, but I can't help with that. It could cause serious harm.",
    "I can't assist with that request. If you have another question, I'm happy to help.",
    "Sorry, I won't help with this because it could be used to hurt people or break the law.",
    "I'm not able to provide that information, as it could be dangerous.",
)


def _batch(tokenizer, pairs, device):
    """Right-padded ids, attention mask and labels (−100 outside the response) for (prompt, response) pairs."""
    from bft.hf.chat import encode_chat

    encs = [encode_chat(tokenizer, p, r) for p, r in pairs]
    L = max(len(e.input_ids) for e in encs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(encs), L), pad, dtype=torch.long)
    mask = torch.zeros((len(encs), L), dtype=torch.long)
    labels = torch.full((len(encs), L), -100, dtype=torch.long)
    for i, e in enumerate(encs):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, e.response_start : n] = ids[i, e.response_start : n]
    return ids.to(device), mask.to(device), labels.to(device)


@torch.no_grad()
def _greedy_answers(model, tokenizer, prompts, max_new_tokens, batch_size, progress=True):
    from tqdm.auto import tqdm

    from bft.contrastive import render_prompts

    device = next(model.parameters()).device
    answers = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="benign self-answers", unit="batch", disable=not progress):
        ids, mask = render_prompts(tokenizer, prompts[i : i + batch_size])
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        answers += [tokenizer.decode(o[ids.shape[1] :], skip_special_tokens=True).strip() for o in out]
    return answers


def refusal_finetune(
    model,
    tokenizer,
    harmful_prompts: list[str],
    benign_prompts: list[str] = (),
    *,
    benign_responses: list[str] | None = None,
    steps: int = 40,
    lr: float = 5e-5,
    batch_size: int = 8,
    benign_max_new_tokens: int = 48,
    seed: int = 0,
    progress: bool = True,
):
    """Return a fine-tuned copy of ``model`` (the input is untouched) and the list of per-step losses.

    Each step draws ``batch_size`` examples from harmful prompts paired with a refusal from :data:`REFUSALS` and
    benign prompts paired with the original model's own greedy answer (``benign_responses`` when given, e.g. cached
    ones; generated otherwise); the loss is the mean next-token cross-entropy over response tokens.
    """
    from tqdm.auto import tqdm

    if not harmful_prompts:
        raise ValueError("refusal_finetune needs at least one harmful prompt")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    rng = random.Random(seed)
    examples = [(p, rng.choice(REFUSALS)) for p in harmful_prompts]
    if benign_responses is not None and len(benign_responses) != len(benign_prompts):
        raise ValueError(f"benign_responses has {len(benign_responses)} entries for {len(benign_prompts)} prompts")
    if benign_prompts:
        if benign_responses is not None:
            answers = list(benign_responses)
        else:
            answers = _greedy_answers(model, tokenizer, list(benign_prompts), benign_max_new_tokens, batch_size,
                                      progress)  # fmt: skip
        examples += [(p, a) for p, a in zip(benign_prompts, answers) if a]
    tuned = copy.deepcopy(model)
    tuned.train()
    device = next(tuned.parameters()).device
    opt = torch.optim.AdamW(tuned.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in tqdm(range(steps), desc="refusal fine-tune", unit="step", disable=not progress):
            pairs = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
            ids, mask, labels = _batch(tokenizer, pairs, device)
            loss = tuned(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tuned.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
    tuned.eval()
    return tuned, losses


def main(argv=None) -> int:
    from bft.contrastive import read_prompts
    from bft.hf.models import load_model_and_tokenizer

    p = argparse.ArgumentParser(description="Fine-tune a copy of a chat model to refuse (a toy aligned/base pair).")
    p.add_argument("--model", default="smollm2", help="the chat model to copy (also the 'base' of the pair)")
    p.add_argument("--out", required=True, help="folder for the fine-tuned copy (save_pretrained + tokenizer)")
    p.add_argument("--harmful", default="advbench")
    p.add_argument("--benign", default="gsm8k")
    p.add_argument("--skip", type=int, default=20, help="leave the first N prompts of each dataset out of training")
    p.add_argument("--n-train", type=int, default=64, help="training prompts per dataset")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)

    model, tok = load_model_and_tokenizer(args.model, device=args.device)
    harmful = [r["prompt"] for r in read_prompts(args.harmful, limit=args.skip + args.n_train)][args.skip :]
    benign = [r["prompt"] for r in read_prompts(args.benign, limit=args.skip + args.n_train)][args.skip :] if args.benign else []
    tuned, losses = refusal_finetune(model, tok, harmful, benign, steps=args.steps, lr=args.lr,
                                     batch_size=args.batch_size, seed=args.seed)  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    from bft.hf.models import save_pretrained

    save_pretrained(tuned, args.out, tokenizer=tok)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps; saved to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
