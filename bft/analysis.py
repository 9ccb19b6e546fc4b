"""Position-wise base-favored token analysis of an aligned/base model pair (paper Algorithm 1, Fig. 1, 2, 3).

For harmful prompts (optionally forced to start with an adversarial response prefix, "prefill") and benign
prompts, the aligned model generates greedily; then both models score the generated sequences (one
teacher-forced forward each, which gives exactly the next-token distributions seen at every generation step) and
at every response position t (0 = first generated token, after any prefill) we record, with ℓ_a, ℓ_b the aligned
and base log-probs over the full vocabulary V:

    kl              KL(π_a ‖ π_b) = Σ_v π_a(v)·(ℓ_a(v) − ℓ_b(v))                      (nats)
    js              Jensen-Shannon divergence ½KL(π_a‖m) + ½KL(π_b‖m), m = ½(π_a + π_b)    (nats, ≤ ln 2)
    top_overlap     |top-n(π_a) ∩ top-n(π_b)| / n                                     (n = 100 by default)
    bf_count        |B_t| = #{v ∈ V : ℓ_b(v) > ℓ_a(v)}                                (Eq. 6, full vocabulary)
    bf_count_top    #{v ∈ top-n(π_a) : ℓ_b(v) > ℓ_a(v)}                               (the paper's Fig. 1 count)
    kl_decoded      KL(π_dec ‖ π_b) with π_dec the distribution actually decoded from: π_a for normal decoding,
                    softmax of Eq. 7 for contrastive decoding (the paper's Fig. 3 quantity)

and which ids are base-favored: the ids of top-n(π_a) with ℓ_b > ℓ_a (counted over all positions, Fig. 2) and
Algorithm 1's top-k of Δ = base − aligned logits. Output: ``analysis.json`` (config, per-position means per group,
per-prompt per-position values, most frequent base-favored tokens decoded to text) and three PNGs.

CLI: ``bft analyze --base M --aligned M --harmful DATA --benign DATA --out DIR``.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field

import torch

from bft.contrastive import (
    _position_ids,
    add_model_arguments,
    atomic_write_text,
    contrastive_generate,
    contrastive_logprobs,
    load_pair,
    read_prompts,
    render_prompts,
)
from bft.reference import base_favored_tokens, topk_lowest_id_ties

__all__ = [
    "METRICS",
    "position_metrics",
    "score_responses",
    "analyze_pair",
    "teacher_forced_records",
    "summarize",
    "plot_analysis",
    "write_analysis",
]

#: Per-position metrics recorded for every response position (see the module docstring).
METRICS = ("kl", "js", "top_overlap", "bf_count", "bf_count_top", "kl_decoded")


def _kl_from_logprobs(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last dim from log-probs; terms with p = 0 contribute 0."""
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)


@torch.no_grad()
def position_metrics(
    aligned_logits: torch.Tensor,
    base_logits: torch.Tensor,
    *,
    top_n: int = 100,
    algorithm1_k: int = 10,
    alpha: float | None = None,
    chunk_rows: int = 256,
) -> dict[str, torch.Tensor]:
    """The per-position metrics of the module docstring for [N, V] logits (one row per position).

    Returns fp32 [N] tensors for each name in :data:`METRICS` (``kl_decoded`` uses Eq. 7 with ``alpha`` when given,
    else equals ``kl``), plus ``top_ids`` [N, top_n] (aligned top-n ids, ties to the lower id), ``top_favored``
    [N, top_n] bool (which of them are base-favored) and ``algorithm1_ids`` [N, algorithm1_k] (top-k of Δ logits
    via :func:`bft.base_favored_tokens`). Everything is computed in fp32, ``chunk_rows`` rows at a time.
    """
    if aligned_logits.shape != base_logits.shape or aligned_logits.dim() != 2:
        raise ValueError(
            f"expected aligned and base logits of the same [N, V] shape, got {tuple(aligned_logits.shape)} and "
            f"{tuple(base_logits.shape)}"
        )
    V = aligned_logits.shape[-1]
    if not 1 <= top_n <= V:
        raise ValueError(f"top_n={top_n} must be in [1, V={V}]")
    if not 1 <= algorithm1_k <= V:
        raise ValueError(f"algorithm1_k={algorithm1_k} must be in [1, V={V}]")
    out = collections.defaultdict(list)
    for start in range(0, aligned_logits.shape[0], chunk_rows):
        a = aligned_logits[start : start + chunk_rows].float()
        b = base_logits[start : start + chunk_rows].float()
        la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        out["kl"].append(_kl_from_logprobs(la, lb))
        lm = torch.logaddexp(la, lb) - math.log(2.0)
        out["js"].append(0.5 * _kl_from_logprobs(la, lm) + 0.5 * _kl_from_logprobs(lb, lm))
        top_a = topk_lowest_id_ties(la, top_n)
        top_b = topk_lowest_id_ties(lb, top_n)
        shared = (top_a[:, :, None] == top_b[:, None, :]).any(-1).sum(-1)
        out["top_overlap"].append(shared.float() / top_n)
        favored = base_favored_tokens(base_logits=b, aligned_logits=a, k=algorithm1_k)
        out["bf_count"].append(favored.count.float())
        out["algorithm1_ids"].append(favored.ids)
        top_favored = torch.gather(lb, -1, top_a) > torch.gather(la, -1, top_a)
        out["bf_count_top"].append(top_favored.sum(-1).float())
        out["top_ids"].append(top_a)
        out["top_favored"].append(top_favored)
        if alpha is None:
            out["kl_decoded"].append(out["kl"][-1])
        else:
            ld = torch.log_softmax(contrastive_logprobs(a, b, alpha), -1)
            out["kl_decoded"].append(_kl_from_logprobs(ld, lb))
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def score_responses(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Next-token logits [B, T, V] of ``model`` for the T = L − prompt_len generated tokens of left-padded
    ``sequences`` [B, L] (``attention_mask`` covers the prompt part [B, prompt_len] or all of L).

    Row t is the distribution the model had when it produced token ``prompt_len + t``; one forward with the same
    position ids as ``generate`` (cumsum of the mask), keeping only the logits that are needed.
    """
    B, L = sequences.shape
    T = L - prompt_len
    if T < 1:
        raise ValueError(f"no generated tokens: sequences have length {L}, prompt_len={prompt_len}")
    if attention_mask.shape[1] == prompt_len:
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, T)], dim=1)
    device = next(model.parameters()).device
    mask = attention_mask.to(device)
    out = model(
        input_ids=sequences.to(device),
        attention_mask=mask,
        position_ids=_position_ids(mask),
        use_cache=False,
        logits_to_keep=T + 1,
    )
    return out.logits[:, :-1, :]


def _response_valid(new_tokens: torch.Tensor, eos_ids: set[int]) -> torch.Tensor:
    """[B, T] bool: position t is a real generation step (no end-of-sequence token among tokens 0..t−1)."""
    is_eos = torch.zeros_like(new_tokens, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= new_tokens == e
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return before == 0


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        e = getattr(source, "eos_token_id", None)
        if e is None:
            continue
        ids.update(int(x) for x in (e if isinstance(e, (list, tuple)) else [e]))
    return ids


@dataclass
class _Counters:
    favored_in_top: collections.Counter = field(default_factory=collections.Counter)
    algorithm1: collections.Counter = field(default_factory=collections.Counter)
    positions: int = 0


@torch.no_grad()
def analyze_pair(
    aligned_model,
    base_model,
    tokenizer,
    groups: dict[str, list[dict]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    alpha: float | None = 1.0,
    contrastive_groups: tuple[str, ...] = ("harmful",),
    top_n: int = 100,
    algorithm1_k: int = 10,
    system: str | None = None,
    progress: bool = True,
) -> dict:
    """Run the position-wise analysis; returns the JSON-ready result (see :func:`write_analysis`).

    ``groups`` maps a group name ("harmful", "benign") to rows ``{"prompt": str, "prefill": str}`` (prefill may be
    "" or absent). Every group is decoded normally (greedy, aligned model); the groups in ``contrastive_groups``
    are also decoded with Eq. 7 contrastive decoding at strength ``alpha`` (skipped when ``alpha`` is None or 0).
    """
    from tqdm.auto import tqdm

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not groups or not any(groups.values()):
        raise ValueError("no prompts to analyze: every group is empty")
    unknown = [g for g in contrastive_groups if g not in groups]
    if unknown:
        raise ValueError(f"contrastive_groups {unknown} are not among the groups {sorted(groups)}")
    eos = _eos_ids(aligned_model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos), 0)
    runs = [(g, "normal") for g in groups if groups[g]]
    if alpha:
        runs += [(g, "contrastive") for g in contrastive_groups if groups[g]]
    records, counters = [], {}
    n_batches = sum(math.ceil(len(groups[g]) / batch_size) for g, _ in runs)
    bar = tqdm(total=n_batches, desc="analyze", unit="batch", disable=not progress)
    for group, mode in runs:
        rows = groups[group]
        c = counters.setdefault(f"{group}/{mode}", _Counters())
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            prefills = [r.get("prefill", "") or "" for r in chunk]
            ids, mask = render_prompts(tokenizer, [r["prompt"] for r in chunk], prefills, system=system)
            gen = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            if mode == "normal":
                device = next(aligned_model.parameters()).device
                seqs = aligned_model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **gen)
            else:
                seqs = contrastive_generate(aligned_model, base_model, ids, mask, alpha=alpha, **gen)
            seqs = seqs.cpu()
            L0 = ids.shape[1]
            new = seqs[:, L0:]
            valid = _response_valid(new, eos)
            a = score_responses(aligned_model, seqs, mask, L0)
            b = score_responses(base_model, seqs, mask, L0).to(a.device)
            V = min(a.shape[-1], b.shape[-1], len(tokenizer))  # drop padded lm_head rows
            B, T = new.shape
            m = position_metrics(
                a[..., :V].reshape(B * T, V), b[..., :V].reshape(B * T, V), top_n=top_n,
                algorithm1_k=algorithm1_k, alpha=alpha if mode == "contrastive" else None,
            )  # fmt: skip
            m = {k: v.reshape(B, T, *v.shape[1:]).cpu() for k, v in m.items()}
            for j, row in enumerate(chunk):
                n = int(valid[j].sum())
                rec = {
                    "group": group,
                    "mode": mode,
                    "index": i + j,
                    "prompt": row["prompt"],
                    "prefill": prefills[j],
                    "response": tokenizer.decode(new[j, :n], skip_special_tokens=True),
                    "n_positions": n,
                    "metrics": {k: [round(float(x), 6) for x in m[k][j, :n]] for k in METRICS},
                    "algorithm1_ids": m["algorithm1_ids"][j, :n].tolist(),
                }
                records.append(rec)
                fav_ids = m["top_ids"][j, :n][m["top_favored"][j, :n]]
                c.favored_in_top.update(fav_ids.tolist())
                c.algorithm1.update(m["algorithm1_ids"][j, :n].flatten().tolist())
                c.positions += n
            bar.update(1)
    bar.close()
    return {
        "config": {
            "max_new_tokens": max_new_tokens, "batch_size": batch_size, "alpha": alpha, "top_n": top_n,
            "algorithm1_k": algorithm1_k, "contrastive_groups": list(contrastive_groups), "system": system,
            "decoding": "greedy", "metric_units": "nats",
        },  # fmt: skip
        "summary": summarize(records),
        "top_base_favored": {
            key: {
                "positions": c.positions,
                "in_aligned_top_n": _decoded_counts(tokenizer, c.favored_in_top),
                "algorithm1_top_k": _decoded_counts(tokenizer, c.algorithm1),
            }
            for key, c in counters.items()
        },
        "records": records,
    }


@torch.no_grad()
def teacher_forced_records(
    aligned_model,
    base_model,
    tokenizer,
    rows: list[dict],
    *,
    group: str,
    batch_size: int = 8,
    top_n: int = 100,
    algorithm1_k: int = 10,
    system: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Per-position metrics along *given* responses: ``rows`` are ``{"prompt", "response"}`` and both models are
    teacher-forced on the chat-rendered prompt + response (Qi et al.'s per-token KL on harmful responses).

    Position t is the distribution over response token t (0 = the first response token). Records have the shape of
    :func:`analyze_pair`'s (``mode = "teacher_forced"``), so :func:`summarize` and the plots take them as they are.
    """
    from tqdm.auto import tqdm

    from bft.hf.chat import encode_chat

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    records = []
    for i in tqdm(range(0, len(rows), batch_size), desc=f"teacher-forced {group}", unit="batch", disable=not progress):
        chunk = [r for r in rows[i : i + batch_size] if (r.get("response") or "").strip()]
        if not chunk:
            continue
        encs = [encode_chat(tokenizer, r["prompt"], r["response"], system=system) for r in chunk]
        # drop the closing end-of-turn token: positions are the response's own tokens
        seqs = [e.input_ids[:-1] for e in encs]
        L = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), L), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for j, x in enumerate(seqs):
            ids[j, : len(x)] = torch.tensor(x)
            mask[j, : len(x)] = 1
        logits = []
        for model in (aligned_model, base_model):
            device = next(model.parameters()).device
            logits.append(model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits)
        V = min(logits[0].shape[-1], logits[1].shape[-1], len(tokenizer))  # drop padded lm_head rows
        spans = [(e.response_start - 1, len(x) - 1) for e, x in zip(encs, seqs)]  # logits that predict the response
        a = torch.cat([logits[0][j, s:t, :V].float().cpu() for j, (s, t) in enumerate(spans)])
        b = torch.cat([logits[1][j, s:t, :V].float().cpu() for j, (s, t) in enumerate(spans)])
        m = position_metrics(a, b, top_n=top_n, algorithm1_k=algorithm1_k)
        offset = 0
        for j, (s, t) in enumerate(spans):
            n = t - s
            rec = {
                "group": group,
                "mode": "teacher_forced",
                "index": i + j,
                "prompt": chunk[j]["prompt"],
                "prefill": "",
                "response": chunk[j]["response"],
                "n_positions": n,
                "metrics": {k: [round(float(x), 6) for x in m[k][offset : offset + n]] for k in METRICS},
                "algorithm1_ids": m["algorithm1_ids"][offset : offset + n].tolist(),
            }
            records.append(rec)
            offset += n
    return records


def _decoded_counts(tokenizer, counter: collections.Counter, n: int = 40) -> list[dict]:
    return [{"id": int(i), "token": tokenizer.decode([i]), "count": int(k)} for i, k in counter.most_common(n)]


def summarize(records: list[dict], *, early: tuple[int, int] = (0, 3), late_from: int = 15) -> dict:
    """Per ``group/mode``: per-position mean of every metric over the prompts still generating at that position
    (``n`` of them), and the means over early positions [early) and late positions ≥ late_from (the paper's
    "positions 0-2" and "15+")."""
    by_key = collections.defaultdict(list)
    for r in records:
        by_key[f"{r['group']}/{r['mode']}"].append(r)
    summary = {}
    for key, recs in by_key.items():
        T = max((r["n_positions"] for r in recs), default=0)
        entry = {"prompts": len(recs), "n": [sum(r["n_positions"] > t for r in recs) for t in range(T)]}
        for name in METRICS:
            per_pos = []
            for t in range(T):
                vals = [r["metrics"][name][t] for r in recs if r["n_positions"] > t]
                per_pos.append(sum(vals) / len(vals) if vals else None)
            entry[name] = per_pos
            e_vals = [v for r in recs for v in r["metrics"][name][early[0] : early[1]]]
            l_vals = [v for r in recs for v in r["metrics"][name][late_from:]]
            entry[f"{name}_early_mean"] = sum(e_vals) / len(e_vals) if e_vals else None
            entry[f"{name}_late_mean"] = sum(l_vals) / len(l_vals) if l_vals else None
        summary[key] = entry
    return summary


# -------------------------------------------------------------------------------------------------------- plots


def _savefig_atomic(fig, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


_LABELS = {
    "kl": "KL(aligned ‖ base) [nats]",
    "js": "Jensen-Shannon [nats]",
    "top_overlap": "top-n overlap (fraction)",
    "bf_count_top": "base-favored among aligned top-n",
    "bf_count": "base-favored over full vocabulary",
    "kl_decoded": "KL(decoded ‖ base) [nats]",
}


def plot_analysis(result: dict, out_dir: str) -> list[str]:
    """Write fig1_position_profile.png, fig2_base_favored_tokens.png and (when contrastive runs exist)
    fig3_contrastive_kl.png under ``out_dir``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    summary, paths = result["summary"], []
    top_n = result["config"]["top_n"]

    # Fig. 1: metrics vs position, every group under normal decoding
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, name in zip(axes.flat, ["kl", "js", "top_overlap", "bf_count_top", "bf_count", None]):
        for key, entry in sorted(summary.items()):
            if not key.endswith("/normal"):
                continue
            group = key.split("/")[0]
            ys = entry["n"] if name is None else entry[name]
            xs = [t for t, y in enumerate(ys) if y is not None]
            ax.plot(xs, [ys[t] for t in xs], marker=".", label=group)
        label = "prompts still generating" if name is None else _LABELS[name].replace("top-n", f"top-{top_n}")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("response position")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Position-wise aligned vs base (normal decoding)")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "fig1_position_profile.png"))
    _savefig_atomic(fig, paths[-1])
    plt.close(fig)

    # Fig. 2: most frequent base-favored tokens among the aligned model's top-n, per group (normal decoding)
    keys = [k for k in sorted(result["top_base_favored"]) if k.endswith("/normal")]
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 6.5), squeeze=False)
        for ax, key in zip(axes[0], keys):
            items = result["top_base_favored"][key]["in_aligned_top_n"][:20][::-1]
            ax.barh(range(len(items)), [it["count"] for it in items], color="tab:red")
            ax.set_yticks(range(len(items)), [repr(it["token"]) for it in items], fontsize=8)
            ax.set_xlabel("positions where base-favored")
            ax.set_title(f"{key.split('/')[0]}: most frequent base-favored tokens\n(in aligned top-{top_n})", fontsize=10)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "fig2_base_favored_tokens.png"))
        _savefig_atomic(fig, paths[-1])
        plt.close(fig)

    # Fig. 3: KL(decoded ‖ base) vs position, normal vs contrastive decoding
    groups = sorted({k.split("/")[0] for k in summary if k.endswith("/contrastive")})
    if groups:
        fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False)
        alpha = result["config"]["alpha"]
        for ax, group in zip(axes[0], groups):
            for mode, color in (("normal", "tab:blue"), ("contrastive", "tab:orange")):
                entry = summary.get(f"{group}/{mode}")
                if entry is None:
                    continue
                ys = entry["kl_decoded"]
                xs = [t for t, y in enumerate(ys) if y is not None]
                label = "normal decoding" if mode == "normal" else f"contrastive decoding (α={alpha:g})"
                ax.plot(xs, [ys[t] for t in xs], marker=".", color=color, label=label)
                if mode == "contrastive":
                    ys = entry["kl"]
                    ax.plot(xs, [ys[t] for t in xs], ls="--", color=color, alpha=0.6,
                            label="KL(aligned ‖ base) on contrastive tokens")  # fmt: skip
            ax.set_title(f"{group}: KL(decoded ‖ base) per position", fontsize=10)
            ax.set_xlabel("response position")
            ax.set_ylabel("nats")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "fig3_contrastive_kl.png"))
        _savefig_atomic(fig, paths[-1])
        plt.close(fig)
    return paths


def write_analysis(result: dict, out_dir: str, *, plots: bool = True) -> dict[str, str]:
    """Write ``analysis.json`` (atomically) and the plots; returns {"json": path, "plots": [...]}."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "analysis.json")
    atomic_write_text(path, json.dumps(result, ensure_ascii=False, indent=1) + "\n")
    return {"json": path, "plots": plot_analysis(result, out_dir) if plots else []}


# ----------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--harmful", required=True, help="harmful prompts: dataset name (advbench...), path, or .txt")
    parser.add_argument("--benign", default=None, help="benign prompts: dataset name (gsm8k, dolly...), path, or .txt")
    parser.add_argument("--out", required=True, help="output folder for analysis.json and the PNG plots")
    parser.add_argument("--limit", type=int, default=20, help="prompts per group (default 20)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=1.0,
                        help="contrastive decoding strength for the Fig. 3 run on harmful prompts (0 = skip it)")
    parser.add_argument("--prefill", default="", help="adversarial response prefix for harmful prompts")
    parser.add_argument("--prefill-from-data", type=int, default=0, metavar="N",
                        help="prefill each harmful prompt with the first N words of its dataset response "
                             "(AdvBench targets: 'Sure, here is ...')")  # fmt: skip
    parser.add_argument("--top-n", type=int, default=100, help="size of the top-n sets (overlap, counts); paper: 100")
    parser.add_argument("--algorithm1-k", type=int, default=10, help="Algorithm 1 top-k ids recorded per position")
    parser.add_argument("--system", default=None, help="system prompt for the chat template")
    parser.add_argument("--no-plots", action="store_true")


def run(args) -> int:
    from bft.contrastive import _prefills

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    harmful = read_prompts(args.harmful, limit=args.limit)
    groups = {"harmful": [{"prompt": r["prompt"], "prefill": p}
                          for r, p in zip(harmful, _prefills(harmful, args.prefill, args.prefill_from_data))]}
    if args.benign:
        groups["benign"] = [{"prompt": r["prompt"], "prefill": ""} for r in read_prompts(args.benign, limit=args.limit)]
    aligned_model, base_model, tokenizer = load_pair(args.aligned, args.base, gguf_file=args.gguf_file,
                                                     base_gguf_file=args.base_gguf_file, device=args.device)  # fmt: skip
    result = analyze_pair(
        aligned_model, base_model, tokenizer, groups, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, alpha=args.alpha, top_n=args.top_n, algorithm1_k=args.algorithm1_k,
        system=args.system,
    )  # fmt: skip
    result["config"].update(aligned=args.aligned, base=args.base, harmful=args.harmful, benign=args.benign,
                            prefill=args.prefill, prefill_from_data=args.prefill_from_data)  # fmt: skip
    written = write_analysis(result, args.out, plots=not args.no_plots)
    for key, entry in result["summary"].items():
        print(f"{key:22s} prompts={entry['prompts']:3d}  KL early/late = {_fmt(entry['kl_early_mean'])}/"
              f"{_fmt(entry['kl_late_mean'])}  base-favored in top-{args.top_n} early/late = "
              f"{_fmt(entry['bf_count_top_early_mean'])}/{_fmt(entry['bf_count_top_late_mean'])}",
              file=sys.stderr)  # fmt: skip
    print(f"wrote {written['json']} and {len(written['plots'])} plots", file=sys.stderr)
    return 0


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"
