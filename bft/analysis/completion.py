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

and, for each student, which way training moved M, split by the sign of each id's starting logit a_v (the split
along which "l2" pulls opposite ways; "mass" and "unlikelihood" pull every id of M down):

    dlogp_neg        mean over (position, v ∈ M) with a_v < 0 of log π_s(v) − log π_a(v);  count_neg their number
    dlogp_pos        the same over a_v >= 0;  count_pos

M is the loss's own selection (``top_k``, and ``selection`` / ``selection_top_p``: where M is chosen,
:func:`bft.reference.select_base_favored`).

:func:`completion_pull_metrics` computes them on [N, V] logits; :func:`completion_pull` runs the models and averages
over every position of ``rows``.
"""

from __future__ import annotations

import torch

from bft.analysis.positions import teacher_forced_logits
from bft.kernels.params import DEFAULT_SELECTION_TOP_P
from bft.reference import base_favored_tokens

__all__ = ["completion_pull_metrics", "completion_pull"]


@torch.no_grad()
def completion_pull_metrics(
    aligned_logits: torch.Tensor,
    base_logits: torch.Tensor,
    student_logits: torch.Tensor | None = None,
    *,
    top_k: int = 100,
    selection: str = "vocab",
    selection_top_p: float = DEFAULT_SELECTION_TOP_P,
) -> dict[str, torch.Tensor]:
    """The per-position measures of the module docstring for [N, V] logits, as fp32 [N] tensors. M is the loss's
    own selection (:func:`bft.reference.base_favored_tokens`, ties to the lower id). With a student, per position
    also ``dlogp_neg_sum`` / ``count_neg`` (Σ and number of log π_s(v) − log π_a(v) over v ∈ M with a_v < 0) and
    ``dlogp_pos_sum`` / ``count_pos`` (a_v >= 0)."""
    students = [] if student_logits is None else [student_logits]
    out, per_student = _pull_metrics(aligned_logits, base_logits, students, top_k, selection, selection_top_p)
    if per_student:
        out.update(per_student[0])
    return out


def _pull_metrics(
    aligned_logits,
    base_logits,
    students: list,
    top_k: int,
    selection: str = "vocab",
    selection_top_p: float = DEFAULT_SELECTION_TOP_P,
):
    """:func:`completion_pull_metrics` for any number of students, M chosen once: (aligned/base measures, per
    student the mass on M and the log-probability changes on M split by the sign of a_v)."""
    a, b = aligned_logits.float(), base_logits.float()
    for s in students:
        if s.shape != a.shape:
            raise ValueError(f"student logits {tuple(s.shape)} differ in shape from the aligned {tuple(a.shape)}")
    ids = base_favored_tokens(
        aligned_logits=a, base_logits=b, top_k=top_k, selection=selection, selection_top_p=selection_top_p
    ).ids
    a_m = a.gather(-1, ids)
    neg = a_m < 0
    logp_a = torch.log_softmax(a, -1).gather(-1, ids)
    out = {
        "share_negative": (a_m < 0).float().mean(-1),
        "share_below_mean": (a_m < a.mean(-1, keepdim=True)).float().mean(-1),
        "logit_m": a_m.mean(-1),
        "logit_v": a.mean(-1),
        "mass_aligned": torch.softmax(a, -1).gather(-1, ids).sum(-1),
        "mass_base": torch.softmax(b, -1).gather(-1, ids).sum(-1),
    }
    per_student = []
    for s in students:
        logp_s = torch.log_softmax(s.float(), -1).gather(-1, ids)
        change = logp_s - logp_a
        per_student.append(
            {
                # the formula of mass_aligned, so that a student equal to the aligned model has a ratio of exactly 1
                "mass_student": torch.softmax(s.float(), -1).gather(-1, ids).sum(-1),
                "dlogp_neg_sum": torch.where(neg, change, 0.0).sum(-1),
                "count_neg": neg.sum(-1).float(),
                "dlogp_pos_sum": torch.where(neg, 0.0, change).sum(-1),
                "count_pos": (~neg).sum(-1).float(),
            }
        )
    return out, per_student


def completion_pull(
    aligned_model,
    base_model,
    tokenizer,
    rows: list[dict],
    *,
    top_k: int = 100,
    students: dict | None = None,
    batch_size: int = 8,
    system: str | None = None,
    progress: bool = True,
    selection: str = "vocab",
    selection_top_p: float = DEFAULT_SELECTION_TOP_P,
) -> dict:
    """Every measure of the module docstring averaged over all response positions of ``rows`` (``{"prompt",
    "response"}``, teacher-forced), for each of ``students`` (name -> model; the aligned model alone when none).

    Returns ``{"positions", "rows", "top_k", "aligned": {share_negative, share_below_mean, logit_m, logit_v,
    mass_aligned, mass_base}, "students": {name: {"mass_student", "mass_ratio", "dlogp_neg", "count_neg",
    "dlogp_pos", "count_pos"}}}`` where ``mass_ratio`` is mass_student / mass_aligned over all positions (> 1:
    training raised the base-favored mass) and ``dlogp_*`` are means over every (position, v ∈ M) of that sign
    (None when there is none). ``selection`` / ``selection_top_p`` (the loss's settings) choose M; a non-default
    rule is recorded under "selection".
    """
    students = dict(students or {})
    names = list(students)
    sums: dict[str, float] = {}
    student_sums = {n: {} for n in names}
    positions = kept = 0
    models = [aligned_model, base_model] + [students[n] for n in names]
    for _, chunk, logits, lengths in teacher_forced_logits(
        models, tokenizer, rows, batch_size=batch_size, system=system, desc="completion pull", progress=progress
    ):
        with torch.no_grad():
            m, per_student = _pull_metrics(logits[0], logits[1], logits[2:], top_k, selection, selection_top_p)
        for key, value in m.items():
            sums[key] = sums.get(key, 0.0) + value.sum().item()
        for name, measures in zip(names, per_student):
            for key, value in measures.items():
                student_sums[name][key] = student_sums[name].get(key, 0.0) + value.sum().item()
        positions += sum(lengths)
        kept += len(chunk)
    if not positions:
        raise ValueError("completion_pull needs rows with non-empty responses")
    aligned = {key: value / positions for key, value in sums.items()}

    def student(t: dict) -> dict:
        mass = t["mass_student"] / positions
        ratio = mass / aligned["mass_aligned"] if aligned["mass_aligned"] > 0 else None
        out = {"mass_student": mass, "mass_ratio": ratio}
        for sign in ("neg", "pos"):
            n = round(t[f"count_{sign}"])
            out[f"dlogp_{sign}"] = t[f"dlogp_{sign}_sum"] / n if n else None
            out[f"count_{sign}"] = n
        return out

    result = {
        "positions": positions,
        "rows": kept,
        "top_k": top_k,
        "aligned": aligned,
        "students": {n: student(student_sums[n]) for n in names},
    }
    if selection != "vocab":
        result["selection"] = {"rule": selection, "top_p": selection_top_p}
    return result
