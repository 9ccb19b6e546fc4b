"""The scales behind the BFT loss defaults (``alpha_base``, ``gamma``, ``l2_reg``), measured on real models.

    python benchmarks/loss_scales.py --aligned ORG/model-Instruct --base ORG/model --limit 16
    python benchmarks/loss_scales.py                     # SmolLM2-135M-Instruct as both models, offline

A few AdvBench prompts with their targets ("Sure, here is ...") are encoded with the aligned model's chat template
and run through both models. At every response position (the rows the trainer scores: the last prompt token
through the last response token, each predicting the next token) the student is the aligned model itself, which
is where training starts. With s = a (student = aligned logits), Δ = b − a and the λ-hybrid teacher, it reports
per position, as mean / median / p10 / p90:

- ``kl``: τ²·KL(softmax(t/τ) ‖ softmax(s/τ)) (and the reverse direction), the first loss term at the start;
- ``sum_s2_topk_delta``: Σ_{v ∈ TopK(Δ, k)} s_v², so ``completion = l2_reg·sum_s2_topk_delta``;
- ``risk``: |{v : π_base(v) > π_aligned(v)}| / V, so ``alpha = alpha_base·(1 + γ·risk)``;
- ``penalty = alpha·completion`` (the second term on a harmful row) and ``penalty_over_kl``, the ratio of the two
  terms at the chosen defaults, plus the norms of their gradients w.r.t. the student logits;
- the student's logit scales that do not depend on Δ: mean, std and maximum of s over the vocabulary and Σ s_v²
  over k ids picked without the base model: the aligned top-k ids (plausible tokens) and k uniformly random ids.

All Δ-dependent numbers (kl, risk, alpha, the TopK(Δ) ids and so the completion, penalty and their ratio) need a
real base/aligned pair. With one model as both (the default, since the only weights shipped offline are
SmolLM2-135M-Instruct) Δ = 0: KL = 0, risk = 0 and TopK(Δ) is just the ids 0..k−1 (the tie rule), so the script
reports those as null and lists them under ``needs_real_pair``; only the logit scales of s are meaningful then.

Writes JSON to ``benchmarks/results/loss_scales_<name>.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import RESULTS, device_name, write_json_atomic  # noqa: E402

from bft.loss import (  # noqa: E402
    DEFAULT_ALPHA_BASE,
    DEFAULT_GAMMA,
    DEFAULT_L2_REG,
    DEFAULT_TEACHER_LAMBDA,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
)
from bft.reference import bft_row_terms, topk_lowest_id_ties  # noqa: E402

DELTA_KEYS = (
    "kl",
    "kl_reverse",
    "risk",
    "alpha",
    "sum_s2_topk_delta",
    "mean_abs_s_topk_delta",
    "completion",
    "penalty",
    "grad_norm_kl",
    "grad_norm_penalty",
    "delta_std",
    "delta_var_under_teacher",
)
SCALE_KEYS = (
    "s_mean",
    "s_std",
    "s_max",
    "sum_s2_top_aligned",
    "sum_s2_random",
    "mean_abs_s_top_aligned",
    "mean_abs_s_random",
)


def _stats(x: torch.Tensor) -> dict:
    x = x.double().flatten()
    q = torch.quantile(x, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"mean": x.mean().item(), "median": q[1].item(), "p10": q[0].item(), "p90": q[2].item()}


def _load(args):
    from bft.hf import models
    from bft.hf.models import load_pair

    same = args.aligned == args.base and args.gguf_file == args.base_gguf_file
    if same:  # one model plays both roles: load it once
        aligned, tokenizer = models.load_model_and_tokenizer(
            args.aligned, gguf_file=args.gguf_file, device=args.device, dtype=args.dtype
        )
        base = aligned
    else:
        aligned, base, tokenizer = load_pair(
            args.aligned,
            args.base,
            gguf_file=args.gguf_file,
            base_gguf_file=args.base_gguf_file,
            device=args.device,
            dtype=args.dtype,
        )
    V = len(tokenizer)
    return aligned, base, tokenizer, V, same


@torch.no_grad()
def _logits(model, ids: torch.Tensor, V: int) -> torch.Tensor:
    from bft.hf import models

    h = models.final_hidden_states(model, ids[None])[0]
    w = models.lm_head_weight(model, vocab_size=V)
    return h.float() @ w.float().T


def position_terms(
    s: torch.Tensor,
    b: torch.Tensor,
    *,
    top_k: int,
    temperature: float,
    teacher_lambda: float,
    alpha_base: float,
    gamma: float,
    l2_reg: float,
    generator: torch.Generator,
) -> dict:
    """Per-row scales for student logits ``s`` (= the aligned model's, at initialisation) and base logits ``b``."""
    n, V = s.shape
    harmful = torch.ones(n, dtype=torch.bool)
    common = dict(
        top_k=top_k,
        temperature=temperature,
        teacher_lambda=teacher_lambda,
        alpha_base=alpha_base,
        gamma=gamma,
        l2_reg=l2_reg,
    )
    s_ = s.detach().clone().requires_grad_(True)
    fwd = bft_row_terms(s_, s.detach(), b, harmful, kl="forward", **common)
    penalty = fwd.alpha * fwd.completion
    (g_kl,) = torch.autograd.grad(fwd.kl.sum(), s_, retain_graph=True)
    (g_pen,) = torch.autograd.grad(penalty.sum(), s_)
    rev = bft_row_terms(s, s, b, harmful, kl="reverse", **common)
    delta = b - s
    teacher = (teacher_lambda * s + (1 - teacher_lambda) * b) / temperature
    p_t = torch.softmax(teacher, -1)
    mean_d = (p_t * delta).sum(-1, keepdim=True)
    top_aligned = topk_lowest_id_ties(s, top_k)
    rand = torch.stack([torch.randperm(V, generator=generator)[:top_k] for _ in range(n)])
    s_top, s_rand, s_delta = (torch.gather(s, -1, i) for i in (top_aligned, rand, fwd.topk_ids))
    return {
        "kl": fwd.kl.detach(),
        "kl_reverse": rev.kl,
        "risk": fwd.risk,
        "alpha": fwd.alpha,
        "sum_s2_topk_delta": s_delta.square().sum(-1),
        "completion": fwd.completion.detach(),
        "penalty": penalty.detach(),
        "grad_norm_kl": g_kl.norm(dim=-1),
        "grad_norm_penalty": g_pen.norm(dim=-1),
        "delta_std": delta.std(-1),
        "delta_var_under_teacher": (p_t * (delta - mean_d).square()).sum(-1),
        "s_mean": s.mean(-1),
        "s_std": s.std(-1),
        "s_max": s.max(-1).values,
        "sum_s2_top_aligned": s_top.square().sum(-1),
        "sum_s2_random": s_rand.square().sum(-1),
        "mean_abs_s_top_aligned": s_top.abs().mean(-1),
        "mean_abs_s_random": s_rand.abs().mean(-1),
        "mean_abs_s_topk_delta": s_delta.abs().mean(-1),
    }


def measure(args) -> dict:
    from bft.hf.chat import encode_chat
    from bft.hf.data import read_prompts

    t0 = time.perf_counter()
    aligned, base, tokenizer, V, same_model = _load(args)
    rows = read_prompts(args.prompts, limit=args.limit)
    hp = dict(
        top_k=args.top_k,
        temperature=args.temperature,
        teacher_lambda=args.teacher_lambda,
        alpha_base=args.alpha_base,
        gamma=args.gamma,
        l2_reg=args.l2_reg,
    )
    gen = torch.Generator().manual_seed(args.seed)
    per_row: dict[str, list[torch.Tensor]] = {}
    n_positions = 0
    max_abs_delta = 0.0
    for r in rows:
        enc = encode_chat(tokenizer, r["prompt"], r["response"], system=args.system)
        ids = torch.tensor(enc.input_ids, dtype=torch.long, device=next(aligned.parameters()).device)
        lo, hi = enc.response_start - 1, len(enc.input_ids) - 1  # hidden state t predicts token t + 1
        a = _logits(aligned, ids, V)[lo:hi].cpu()
        b = a.clone() if base is aligned else _logits(base, ids, V)[lo:hi].cpu()
        max_abs_delta = max(max_abs_delta, (b - a).abs().max().item())
        for key, value in position_terms(a, b, generator=gen, **hp).items():
            per_row.setdefault(key, []).append(value.detach().cpu())
        n_positions += hi - lo
    cat = {k: torch.cat(v) for k, v in per_row.items()}
    identical = max_abs_delta == 0.0
    delta_part = {k: None if identical else _stats(cat[k]) for k in DELTA_KEYS}
    if identical:
        ratio = None
    else:
        ratio = {
            "mean_penalty_over_mean_kl": cat["penalty"].mean().item() / max(cat["kl"].mean().item(), 1e-30),
            "median_of_row_ratios": torch.quantile((cat["penalty"] / cat["kl"].clamp_min(1e-30)).double(), 0.5).item(),
            "mean_grad_norm_penalty_over_kl": cat["grad_norm_penalty"].mean().item()
            / max(cat["grad_norm_kl"].mean().item(), 1e-30),
        }
    # What l2_reg·Σ s² would be at the Δ-free proxies (the bounds a real TopK(Δ) set usually falls between)
    implied = {
        f"l2_reg*sum_s2_{name}": _stats(args.l2_reg * cat[f"sum_s2_{name}"]) for name in ("top_aligned", "random")
    }
    return {
        "benchmark": "BFT loss term scales at the student's initialisation (student = aligned)",
        "aligned": args.aligned,
        "base": args.base,
        "identical_models": identical,
        "same_model_object": same_model,
        "prompts": args.prompts,
        "n_prompts": len(rows),
        "n_positions": n_positions,
        "vocab": V,
        "device": device_name(next(aligned.parameters()).device),
        "torch": torch.__version__,
        "params": {**hp, "kl": "forward"},
        "max_abs_delta": max_abs_delta,
        "needs_real_pair": (list(DELTA_KEYS) + ["penalty_over_kl"]) if identical else [],
        "delta_dependent": delta_part,
        "penalty_over_kl": ratio,
        "student_logit_scales": {k: _stats(cat[k]) for k in SCALE_KEYS},
        "implied_completion_at_proxy_ids": implied,
        "notes": (
            "student = aligned logits (training starts there). Δ-dependent numbers are null when base == aligned "
            "(Δ = 0 makes KL = 0, risk = 0 and TopK(Δ) = ids 0..k-1); run with a real --base to get them. "
            "sum_s2_top_aligned / sum_s2_random are Σ s_v² over the aligned model's own top-k ids / k random ids. "
            "delta_var_under_teacher ≈ 2·KL/(λ−1)² for small Δ (second-order expansion of the KL at s = a)."
        ),
        "seconds": time.perf_counter() - t0,
    }


def _summary(res: dict) -> str:
    lines = [
        f"{res['aligned']} (aligned) vs {res['base']} (base): {res['n_positions']} response positions of "
        f"{res['n_prompts']} prompts, V={res['vocab']}"
    ]
    for key, st in res["student_logit_scales"].items():
        lines.append(
            f"  {key:26s} mean {st['mean']:10.3f}  median {st['median']:10.3f}  "
            f"p10 {st['p10']:10.3f}  p90 {st['p90']:10.3f}"
        )
    for key, st in res["implied_completion_at_proxy_ids"].items():
        lines.append(f"  {key:26s} mean {st['mean']:10.4f}  (l2_reg = {res['params']['l2_reg']:g})")
    if res["identical_models"]:
        lines.append(
            "  base == aligned (Δ = 0): kl, risk, alpha, completion at TopK(Δ) and the term ratio need a "
            "real pair (--base)"
        )
    else:
        for key, st in res["delta_dependent"].items():
            lines.append(
                f"  {key:26s} mean {st['mean']:10.4f}  median {st['median']:10.4f}  "
                f"p10 {st['p10']:10.4f}  p90 {st['p90']:10.4f}"
            )
        lines.append(f"  penalty / kl: {json.dumps(res['penalty_over_kl'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--aligned", default="smollm2", help="aligned model: hub id, local path, .gguf or 'smollm2'")
    p.add_argument("--base", default="smollm2", help="base model (default: the aligned model itself, so Δ = 0)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside the --aligned folder")
    p.add_argument("--base-gguf-file", default=None, help="GGUF file name inside the --base folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="model dtype (bf16, fp16, fp32; default fp32); logits are fp32")
    p.add_argument("--prompts", default="advbench", help="dataset name or path with prompts and responses")
    p.add_argument("--limit", type=int, default=8, help="number of prompts")
    p.add_argument("--system", default=None, help="system prompt for the chat template")
    p.add_argument("--seed", type=int, default=0, help="seed of the random ids")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K)
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    p.add_argument("--teacher-lambda", type=float, default=DEFAULT_TEACHER_LAMBDA)
    p.add_argument("--alpha-base", type=float, default=DEFAULT_ALPHA_BASE)
    p.add_argument("--gamma", type=float, default=DEFAULT_GAMMA)
    p.add_argument("--l2-reg", type=float, default=DEFAULT_L2_REG)
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/loss_scales_<name>.json)")
    args = p.parse_args(argv)
    if args.limit < 1:
        p.error("--limit must be >= 1")
    torch.set_grad_enabled(True)
    res = measure(args)
    name = Path(str(args.aligned)).name.replace(".gguf", "").replace("/", "_")
    out = Path(args.out) if args.out else RESULTS / f"loss_scales_{name}.json"
    write_json_atomic(out, res)
    print(_summary(res))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
