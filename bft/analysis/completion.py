"""Which way the completion penalty pulls the base-favored tokens (paper Eq. 9).

The completion term is L = λ_reg · Σ_{v ∈ M} s_v², M = TopK(logits_base − logits_aligned, k), on the student's raw
logits s. Its gradient is ∂L/∂s_v = 2·λ_reg·s_v, so gradient descent moves every s_v in M towards 0: it lowers a
positive logit and *raises* a negative one, and raising s_v with the other logits fixed raises π(v). The paper reads
Eq. 9 as "suppressing the logit magnitudes" of base-favored tokens; that lowers their probability only where s_v > 0.
These measures say how much of M the penalty actually pushes down, and what training did to M's probability mass.

Per response position, along given responses (teacher-forced), with a = aligned logits (the student's start),
b = base, s = a trained student, π the softmax of each:

    share_negative   #{v ∈ M : a_v < 0} / k       the share of M whose logit the penalty's gradient raises
    share_below_mean #{v ∈ M : a_v < mean_V(a)} / k
    logit_m, logit_v mean of a over M, and over the vocabulary
    mass_aligned     Σ_{v ∈ M} π_a(v);  mass_base and mass_student likewise (the same M, chosen from a and b)

:func:`completion_pull_metrics` computes them on [N, V] logits; :func:`completion_pull` runs the models and averages
over every position of ``rows``.
"""

from __future__ import annotations

import torch

from bft.analysis.positions import teacher_forced_logits
from bft.reference import base_favored_tokens

__all__ = ["completion_pull_metrics", "completion_pull"]


@torch.no_grad()
def completion_pull_metrics(aligned_logits: torch.Tensor, base_logits: torch.Tensor,
                            student_logits: torch.Tensor | None = None, *, top_k: int = 100) -> dict[str, torch.Tensor]:  # fmt: skip
    """The per-position measures of the module docstring for [N, V] logits, as fp32 [N] tensors. M is the loss's
    own selection (:func:`bft.reference.base_favored_tokens`, ties to the lower id)."""
    students = [] if student_logits is None else [student_logits]
    out, masses = _pull_metrics(aligned_logits, base_logits, students, top_k)
    if masses:
        out["mass_student"] = masses[0]
    return out


def _pull_metrics(aligned_logits, base_logits, students: list, top_k: int):
    """:func:`completion_pull_metrics` for any number of students, M chosen once: (aligned/base measures, the
    mass on M under each student)."""
    a, b = aligned_logits.float(), base_logits.float()
    for s in students:
        if s.shape != a.shape:
            raise ValueError(f"student logits {tuple(s.shape)} differ in shape from the aligned {tuple(a.shape)}")
    ids = base_favored_tokens(aligned_logits=a, base_logits=b, top_k=top_k).ids
    a_m = a.gather(-1, ids)
    out = {
        "share_negative": (a_m < 0).float().mean(-1),
        "share_below_mean": (a_m < a.mean(-1, keepdim=True)).float().mean(-1),
        "logit_m": a_m.mean(-1),
        "logit_v": a.mean(-1),
        "mass_aligned": torch.softmax(a, -1).gather(-1, ids).sum(-1),
        "mass_base": torch.softmax(b, -1).gather(-1, ids).sum(-1),
    }
    return out, [torch.softmax(s.float(), -1).gather(-1, ids).sum(-1) for s in students]


def completion_pull(aligned_model, base_model, tokenizer, rows: list[dict], *, top_k: int = 100,
                    students: dict | None = None, batch_size: int = 8, system: str | None = None,
                    progress: bool = True) -> dict:  # fmt: skip
    """Every measure of the module docstring averaged over all response positions of ``rows`` (``{"prompt",
    "response"}``, teacher-forced), for each of ``students`` (name -> model; the aligned model alone when none).

    Returns ``{"positions", "rows", "top_k", "aligned": {share_negative, share_below_mean, logit_m, logit_v,
    mass_aligned, mass_base}, "students": {name: {"mass_student", "mass_ratio"}}}`` where ``mass_ratio`` is
    mass_student / mass_aligned over all positions (> 1: training raised the base-favored mass).
    """
    students = dict(students or {})
    names = list(students)
    sums: dict[str, float] = {}
    student_mass = dict.fromkeys(names, 0.0)
    positions = kept = 0
    models = [aligned_model, base_model] + [students[n] for n in names]
    for _, chunk, logits, lengths in teacher_forced_logits(models, tokenizer, rows, batch_size=batch_size,
                                                           system=system, desc="completion pull", progress=progress):  # fmt: skip
        with torch.no_grad():
            m, masses = _pull_metrics(logits[0], logits[1], logits[2:], top_k)
        for key, value in m.items():
            sums[key] = sums.get(key, 0.0) + value.sum().item()
        for name, mass in zip(names, masses):
            student_mass[name] += mass.sum().item()
        positions += sum(lengths)
        kept += len(chunk)
    if not positions:
        raise ValueError("completion_pull needs rows with non-empty responses")
    aligned = {key: value / positions for key, value in sums.items()}
    return {
        "positions": positions,
        "rows": kept,
        "top_k": top_k,
        "aligned": aligned,
        "students": {n: {"mass_student": student_mass[n] / positions,
                         "mass_ratio": (student_mass[n] / positions / aligned["mass_aligned"]
                                        if aligned["mass_aligned"] > 0 else None)} for n in names},
    }  # fmt: skip
