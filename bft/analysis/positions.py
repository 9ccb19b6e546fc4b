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

Plots: :mod:`bft.analysis.plots`. CLI: ``bft analyze --base M --aligned M --harmful DATA --benign DATA --out DIR``.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from bft.decoding import contrastive_generate, contrastive_logprobs
from bft.hf.batching import eos_token_ids, pad_batch, pad_token_id, position_ids
from bft.hf.chat import encode_chat, render_prompts
from bft.reference import base_favored_tokens, topk_lowest_id_ties

__all__ = [
    "METRICS",
    "position_metrics",
    "score_responses",
    "analyze_pair",
    "teacher_forced_records",
    "teacher_forced_logits",
    "summarize",
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
    top_k: int = 10,
    alpha: float | None = None,
    chunk_rows: int = 256,
) -> dict[str, torch.Tensor]:
    """The per-position metrics of the module docstring for [N, V] logits (one row per position).

    Returns fp32 [N] tensors for each name in :data:`METRICS` (``kl_decoded`` uses Eq. 7 with ``alpha`` when given,
    else equals ``kl``), plus ``top_ids`` [N, top_n] (aligned top-n ids, ties to the lower id), ``top_favored``
    [N, top_n] bool (which of them are base-favored) and ``algorithm1_ids`` [N, top_k] (top-k of Δ logits
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
    if not 1 <= top_k <= V:
        raise ValueError(f"top_k={top_k} must be in [1, V={V}]")
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
        favored = base_favored_tokens(aligned_logits=a, base_logits=b, top_k=top_k)
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
        position_ids=position_ids(mask),
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


@dataclass
class _Counters:
    favored_in_top: collections.Counter = field(default_factory=collections.Counter)
    algorithm1: collections.Counter = field(default_factory=collections.Counter)
    positions: int = 0

    def count(self, m: dict, j: int, n: int) -> None:
        """Add row ``j``'s first ``n`` positions of the batch metrics ``m``."""
        self.favored_in_top.update(m["top_ids"][j, :n][m["top_favored"][j, :n]].tolist())
        self.algorithm1.update(m["algorithm1_ids"][j, :n].flatten().tolist())
        self.positions += n


def _generated_batch(aligned_model, base_model, tokenizer, chunk, *, alpha, max_new_tokens, pad, system) -> dict:
    """Greedy continuations of a chunk of ``{"prompt", "prefill"}`` rows: plain decoding of the aligned model, or
    Eq. 7 contrastive decoding when ``alpha`` is set."""
    prefills = [r.get("prefill", "") or "" for r in chunk]
    ids, mask = render_prompts(tokenizer, [r["prompt"] for r in chunk], prefills, system=system)
    gen = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    if alpha is None:
        device = next(aligned_model.parameters()).device
        seqs = aligned_model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **gen)
    else:
        seqs = contrastive_generate(aligned_model, base_model, ids, mask, alpha=alpha, **gen)
    seqs = seqs.cpu()
    return {
        "seqs": seqs,
        "mask": mask,
        "prompt_len": ids.shape[1],
        "new": seqs[:, ids.shape[1] :],
        "prefills": prefills,
    }


def _batch_metrics(aligned_model, base_model, tokenizer, batch: dict, *, top_n, top_k, alpha) -> dict:
    """:func:`position_metrics` of both models teacher-forced on the generated batch, shaped [B, T, ...]."""
    a = score_responses(aligned_model, batch["seqs"], batch["mask"], batch["prompt_len"])
    b = score_responses(base_model, batch["seqs"], batch["mask"], batch["prompt_len"]).to(a.device)
    V = min(a.shape[-1], b.shape[-1], len(tokenizer))  # drop padded lm_head rows
    B, T = batch["new"].shape
    m = position_metrics(
        a[..., :V].reshape(B * T, V), b[..., :V].reshape(B * T, V), top_n=top_n, top_k=top_k, alpha=alpha
    )
    return {k: v.reshape(B, T, *v.shape[1:]).cpu() for k, v in m.items()}


def _record(group, mode, index, prompt, prefill, response, m: dict, j, n, offset=None) -> dict:
    """One prompt's record: its first ``n`` positions of the metrics ``m`` (row ``j`` of a [B, T] batch, or
    positions ``offset .. offset + n`` of a flat [P] batch)."""

    def take(x):
        return x[j, :n] if offset is None else x[offset : offset + n]

    return {
        "group": group,
        "mode": mode,
        "index": index,
        "prompt": prompt,
        "prefill": prefill,
        "response": response,
        "n_positions": n,
        "metrics": {k: [round(float(x), 6) for x in take(m[k])] for k in METRICS},
        "algorithm1_ids": take(m["algorithm1_ids"]).tolist(),
    }


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
    top_k: int = 10,
    system: str | None = None,
    progress: bool = True,
) -> dict:
    """Run the position-wise analysis; returns the JSON-ready result (see :func:`write_analysis`).

    ``groups`` maps a group name ("harmful", "benign") to rows ``{"prompt": str, "prefill": str}`` (prefill may be
    "" or absent). Every group is decoded normally (greedy, aligned model); the groups in ``contrastive_groups``
    are also decoded with Eq. 7 contrastive decoding at strength ``alpha`` (skipped when ``alpha`` is None or 0).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not groups or not any(groups.values()):
        raise ValueError("no prompts to analyze: every group is empty")
    unknown = [g for g in contrastive_groups if g not in groups]
    if unknown:
        raise ValueError(f"contrastive_groups {unknown} are not among the groups {sorted(groups)}")
    eos = eos_token_ids(tokenizer, aligned_model)
    pad = pad_token_id(tokenizer, aligned_model)
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
            batch = _generated_batch(
                aligned_model,
                base_model,
                tokenizer,
                chunk,
                alpha=alpha if mode == "contrastive" else None,
                max_new_tokens=max_new_tokens,
                pad=pad,
                system=system,
            )
            m = _batch_metrics(
                aligned_model,
                base_model,
                tokenizer,
                batch,
                top_n=top_n,
                top_k=top_k,
                alpha=alpha if mode == "contrastive" else None,
            )
            valid = _response_valid(batch["new"], eos)
            for j, row in enumerate(chunk):
                n = int(valid[j].sum())
                records.append(
                    _record(
                        group,
                        mode,
                        i + j,
                        row["prompt"],
                        batch["prefills"][j],
                        tokenizer.decode(batch["new"][j, :n], skip_special_tokens=True),
                        m,
                        j,
                        n,
                    )
                )
                c.count(m, j, n)
            bar.update(1)
    bar.close()
    return {
        "config": {
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "alpha": alpha,
            "top_n": top_n,
            "top_k": top_k,
            "contrastive_groups": list(contrastive_groups),
            "system": system,
            "decoding": "greedy",
            "metric_units": "nats",
        },
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
    top_k: int = 10,
    system: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Per-position metrics along *given* responses: ``rows`` are ``{"prompt", "response"}`` and both models are
    teacher-forced on the chat-rendered prompt + response (Qi et al.'s per-token KL on harmful responses).

    Position t is the distribution over response token t (0 = the first response token). Records have the shape of
    :func:`analyze_pair`'s (``mode = "teacher_forced"``), so :func:`summarize` and the plots take them as they are.
    """
    records = []
    for i, chunk, (a, b), lengths in teacher_forced_logits(
        [aligned_model, base_model],
        tokenizer,
        rows,
        batch_size=batch_size,
        system=system,
        desc=f"teacher-forced {group}",
        progress=progress,
    ):
        m = position_metrics(a, b, top_n=top_n, top_k=top_k)
        offset = 0
        for j, n in enumerate(lengths):
            records.append(
                _record(
                    group, "teacher_forced", i + j, chunk[j]["prompt"], "", chunk[j]["response"], m, j, n, offset=offset
                )
            )
            offset += n
    return records


@torch.no_grad()
def teacher_forced_logits(
    models: list,
    tokenizer,
    rows: list[dict],
    *,
    batch_size: int = 8,
    system: str | None = None,
    desc: str = "teacher-forced",
    progress: bool = True,
):
    """For batches of ``rows`` (``{"prompt", "response"}``, empty responses skipped), every model's fp32 logits
    [N, V] at the positions that predict the response tokens (rows of the batch concatenated; the closing
    end-of-turn token excluded), on the CPU. Yields ``(first row index, kept rows, [logits per model], response
    lengths)``. V is the tokenizer's vocabulary (padded lm_head rows dropped)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad = pad_token_id(tokenizer, models[0])
    for i in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", disable=not progress):
        chunk = [r for r in rows[i : i + batch_size] if (r.get("response") or "").strip()]
        if not chunk:
            continue
        encs = [encode_chat(tokenizer, r["prompt"], r["response"], system=system) for r in chunk]
        # drop the closing end-of-turn token: positions are the response's own tokens
        seqs = [e.input_ids[:-1] for e in encs]
        ids, mask = pad_batch(seqs, pad, side="right")
        logits = []
        for model in models:
            device = next(model.parameters()).device
            logits.append(model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits)
        V = min(min(x.shape[-1] for x in logits), len(tokenizer))  # drop padded lm_head rows
        spans = [(e.response_start - 1, len(x) - 1) for e, x in zip(encs, seqs)]  # logits that predict the response
        yield (
            i,
            chunk,
            [torch.cat([x[j, s:t, :V].float().cpu() for j, (s, t) in enumerate(spans)]) for x in logits],
            [t - s for s, t in spans],
        )


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
