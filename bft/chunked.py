"""The ``"torch"`` backend: the reference math over row chunks, so only [C, V] logits exist at a time.

Each chunk of C rows computes its three fp32 logit blocks (vocabulary-sliced, so the lm_head weights are upcast a
slice at a time), then the per-row terms of :func:`bft.reference.bft_row_terms` with the same tensor operations, and
d(loss)/d(student logits) written out in closed form (no autograd graph over [C, V] blocks), which two GEMMs turn
into the gradients of the student's hidden states and lm_head. The frozen GEMMs run once.

Two things differ from the reference in *how*, never in *what* (tests compare every output with the oracle):

- TopK(Δ) with ties to the lower id: the reference runs a stable sort of all V entries of a row; here
  ``torch.topk`` finds the k-th largest value, the ids above it are taken, and the ids tied with it lowest first,
  which is the same set in O(V) (a full sort was ~40% of the backend's CPU time at V = 65,536).
- gradients: forward KL τ(p_s − p_t); reverse KL τ·p_s·(log p_s − log p_t − KL/τ²), times kl_weight; the
  completion term's times harmful·α (:func:`completion_and_grad`: L2 2·l2_reg·s_v at the k ids, scattered; the
  softmax terms, "log_mass" included, dense). All are scaled by 1/#valid (``scale``) on the fly.
"""

from __future__ import annotations

import math

import torch

from bft.kernels.chunking import fused_outputs, grad_hidden_sliced, logits_sliced, rows_per_block, store_rows
from bft.reference import (
    COMPLETION_TERMS,
    DEFAULT_COMPLETION_FLOOR,
    DEFAULT_SELECTION_TOP_P,
    base_favored_density,
    hybrid_teacher_logits,
    select_base_favored,
    topk_lowest_id_ties,
    topk_mask_lowest_id_ties,
)

# Bytes of one fp32 [C, V] block; a chunk holds about a dozen such blocks (logits, softmaxes, their gradients).
DEFAULT_BLOCK_BYTES = 32 * 2**20


def default_chunk_rows(V: int, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    return rows_per_block(V, block_bytes)


def logits_fp32(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight.T`` accumulated and returned in fp32 (fp64 stays fp64), upcasting W a slice at a time."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    h = hidden.to(dtype)
    if weight.dtype == dtype:
        return h @ weight.T
    return logits_sliced(h, weight, torch.empty(h.shape[0], weight.shape[0], dtype=dtype, device=h.device))


def _grad_hidden(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``g @ weight`` in g's dtype, upcasting W a slice at a time."""
    if weight.dtype == g.dtype:
        return g @ weight
    return grad_hidden_sliced(g, weight, torch.empty(g.shape[0], weight.shape[1], dtype=g.dtype, device=g.device))


def topk_ids_lowest_id_ties(values: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`bft.reference.topk_lowest_id_ties` of a [C, V] block without sorting V entries per row.

    The k ids come from :func:`bft.reference.topk_mask_lowest_id_ties`, then are ordered by (−value, id) with a
    stable sort of k entries. Rows holding NaN fall back to the full stable sort (NaN ranks highest there).
    """
    chosen, kth = topk_mask_lowest_id_ties(values, k)
    if torch.isnan(kth).any():
        return topk_lowest_id_ties(values, k)
    ids = chosen.nonzero()[:, -1].view(values.shape[0], k)  # exactly k per row, ascending ids
    order = torch.sort(torch.gather(values, -1, ids), dim=-1, descending=True, stable=True).indices
    return torch.gather(ids, -1, order)


def favored_ids_and_risk(
    a: torch.Tensor,
    b: torch.Tensor,
    top_k: int,
    dtype: torch.dtype = torch.float32,
    selection: str = "vocab",
    selection_top_p: float = DEFAULT_SELECTION_TOP_P,
):
    """(M's ids with ties to the lower id, risk = base-favored density) of wide [C, V] logits, in the order and
    rounding the loss uses them. M = TopK(b − a) over the vocabulary (``selection="vocab"``, in linear time) or over
    the base model's plausible tokens (:func:`bft.reference.select_base_favored`, the reference's own function)."""
    count = (torch.log_softmax(b, dim=-1) > torch.log_softmax(a, dim=-1)).sum(-1)
    if selection == "vocab":
        ids = topk_ids_lowest_id_ties(b - a, top_k)
    else:
        ids = select_base_favored(b - a, b, top_k, selection, selection_top_p)
    return ids, base_favored_density(count, a.shape[-1], dtype)


def base_favored_rows(
    ah,
    aw,
    bh,
    bw,
    *,
    top_k: int,
    chunk_rows: int | None = None,
    selection: str = "vocab",
    selection_top_p: float = DEFAULT_SELECTION_TOP_P,
):
    """The base-favored ids [N, k] (int64) and risk [N] (fp32) of the aligned / base hidden states and heads: what
    :func:`bft.bft_loss` computes for itself when it is not given ``topk_ids`` and ``risk`` (M chosen by
    ``selection``, :func:`favored_ids_and_risk`). Logits in fp32, a row chunk at a time (the teacher cache stores
    these)."""
    N, V = ah.shape[0], aw.shape[0]
    C = chunk_rows or default_chunk_rows(V)
    ids = torch.empty(N, top_k, dtype=torch.int64, device=ah.device)
    risk = torch.empty(N, dtype=torch.float32, device=ah.device)
    for r0 in range(0, N, C):
        r1 = min(N, r0 + C)
        ids[r0:r1], risk[r0:r1] = favored_ids_and_risk(
            logits_fp32(ah[r0:r1], aw),
            logits_fp32(bh[r0:r1], bw),
            top_k,
            selection=selection,
            selection_top_p=selection_top_p,
        )
    return ids, risk


def completion_and_grad(
    s: torch.Tensor,
    ids: torch.Tensor,
    *,
    completion: str,
    l2_reg: float,
    want_grad: bool,
    completion_floor: float = DEFAULT_COMPLETION_FLOOR,
):
    """The completion term of :func:`bft.reference.completion_values` on wide [C, V] logits s and ids [C, k] (M),
    and its gradient written out, as ``(value [C], add_grad)``: ``add_grad(g, scale, weight)`` adds
    scale·weight[:, None]·∂value/∂s to the [C, V] block g in place (None unless ``want_grad``). With
    π = softmax(s), P = Σ_{v∈M} π_v and Q = 1 − P:

        "l2"            l2_reg·Σ_{v∈M} s_v²            ∂/∂s_j = 2·l2_reg·s_j on M, 0 off M (scattered to the k ids)
        "mass"          P                              ∂/∂s_j = π_j·Q on M,  −P·π_j off M
        "unlikelihood"  −log Q                         ∂/∂s_j = π_j on M,    −P·π_j/Q = −P·q_j off M
        "log_mass"      c = max(0, log P − log p_f)    ∂/∂s_j = 1[c > 0]·r_j·Q on M,  −1[c > 0]·π_j off M

    where q = softmax of s over the complement of M, r = softmax of s over M and p_f = ``completion_floor`` (at
    exactly c = 0 the subgradient is 0). P and Q come from log-sum-exps over M and over its complement (never
    1 − P), so −log Q, q and r·Q (= r − π on M) are exact however close P is to 1, and log P = lse_M − lse however
    small P is.
    """
    s_ids = torch.gather(s, -1, ids)
    if completion == "l2":
        value = l2_reg * s_ids.square().sum(-1)

        def add_l2(g, scale, weight):
            g.scatter_add_(-1, ids, (2.0 * l2_reg * scale) * weight[:, None] * s_ids)

        return value, add_l2 if want_grad else None
    if completion not in ("mass", "unlikelihood", "log_mass"):
        raise ValueError(f"completion must be one of {COMPLETION_TERMS}, got {completion!r}")
    in_m = torch.zeros(s.shape, dtype=torch.bool, device=s.device).scatter_(-1, ids, True)
    lse_c = torch.logsumexp(s.masked_fill(in_m, float("-inf")), dim=-1)  # the complement of M
    lse_m = torch.logsumexp(s_ids, dim=-1)
    lse = torch.logaddexp(lse_m, lse_c)
    P = torch.exp(lse_m - lse)
    if completion == "mass":
        value = P
    elif completion == "unlikelihood":
        value = lse - lse_c
    else:
        value = torch.relu(lse_m - lse - math.log(completion_floor))
    if not want_grad:
        return value, None

    def add_softmax(g, scale, weight):
        if completion == "mass":  # π_j·(1[j∈M] − P)
            pi = torch.exp(s - lse[:, None])
            dense = torch.where(in_m, pi * torch.exp(lse_c - lse)[:, None], -P[:, None] * pi)
        elif completion == "unlikelihood":  # π_j on M, −P·q_j off M
            dense = torch.where(in_m, torch.exp(s - lse[:, None]), -P[:, None] * torch.exp(s - lse_c[:, None]))
        else:  # 1[c > 0]·(r_j·Q on M, −π_j off M), r = softmax over M
            Q = torch.exp(lse_c - lse)
            dense = torch.where(in_m, torch.exp(s - lse_m[:, None]) * Q[:, None], -torch.exp(s - lse[:, None]))
            dense.mul_((value > 0).to(s.dtype)[:, None])
        g.add_(dense.mul_(scale * weight[:, None]))

    return value, add_softmax


def row_terms_and_grad(s, a, b, harmful, *, params, scale: float, want_grad: bool, topk_ids=None, risk=None):
    """Per-row terms of :func:`bft.reference.bft_row_terms` for wide [C, V] logits and, if ``want_grad``,
    ``g = scale·d(Σ_n row_loss_n)/ds`` (a fresh [C, V] block). Returns ``(terms dict, g or None)``; ``terms["kl"]``
    is the unweighted KL_n (``params.kl_weight`` enters ``row_loss`` and ``g`` only).

    ``topk_ids`` [C, k] / ``risk`` [C] given (a teacher cache): the top-k of Δ and the count are skipped."""
    tau = float(params.temperature)
    t = hybrid_teacher_logits(a, b, params.teacher_lambda).to(s.dtype)
    log_pt = torch.log_softmax(t / tau, dim=-1)
    del t
    log_ps = torch.log_softmax(s / tau, dim=-1)
    if params.kl == "forward":  # KL(teacher ‖ student)
        p = log_pt.exp()
        diff = log_pt - log_ps
    else:  # KL(student ‖ teacher)
        p = log_ps.exp()
        diff = log_ps - log_pt
    del log_pt
    kl_raw = (p * diff).sum(-1)
    kl = kl_raw * tau * tau

    if topk_ids is None:
        ids, risk = favored_ids_and_risk(a, b, params.top_k, s.dtype, params.selection, params.selection_top_p)
    else:
        ids, risk = topk_ids.long(), risk.to(s.dtype)
    completion, add_completion_grad = completion_and_grad(
        s,
        ids,
        completion=params.completion,
        l2_reg=params.l2_reg,
        want_grad=want_grad,
        completion_floor=params.completion_floor,
    )
    alpha = params.alpha_base * (1.0 + params.gamma * risk)
    weight = harmful.to(s.dtype) * alpha  # harmful_n·α_n
    row_loss = params.kl_weight * kl + weight * completion
    terms = {"kl": kl, "completion": completion, "risk": risk, "alpha": alpha, "topk_ids": ids, "row_loss": row_loss}
    if not want_grad:
        return terms, None
    if params.kl == "forward":  # τ²·d/ds Σ p_t (log p_t − log_softmax(s/τ)) = τ(p_s − p_t)
        g = log_ps.exp_().sub_(p).mul_(tau * scale * params.kl_weight)
    else:  # τ²·d/ds Σ p_s (log p_s − log p_t) = τ·p_s·(log p_s − log p_t − KL/τ²)
        g = diff.sub_(kl_raw[:, None]).mul_(p).mul_(tau * scale * params.kl_weight)
    add_completion_grad(g, scale, weight)
    return terms, g


def bft_forward_backward_torch(
    sh,
    sw,
    ah,
    aw,
    bh,
    bw,
    harmful,
    *,
    params,
    scale: float,
    need_dh: bool,
    need_dw: bool,
    chunk_rows=None,
    topk_ids=None,
    risk=None,
) -> dict:
    """Loss sum, per-row terms and scaled gradients over (already compacted, all-valid) rows.

    ``scale`` multiplies the gradients (1 / #valid rows of the whole batch); ``loss_sum`` is unscaled.
    ``topk_ids`` [N, k] / ``risk`` [N]: given base-favored ids and density (both or neither).
    """
    N, V = sh.shape[0], sw.shape[0]
    C = chunk_rows or default_chunk_rows(V)
    wide = torch.promote_types(sh.dtype, torch.float32)
    dev = sh.device
    out = fused_outputs(N, V, sh.shape[1], params.top_k, wide, dev, need_dh=need_dh, need_dw=need_dw)
    for r0 in range(0, N, C):
        r1 = min(N, r0 + C)
        a = logits_fp32(ah[r0:r1], aw)
        b = logits_fp32(bh[r0:r1], bw)
        s = logits_fp32(sh[r0:r1], sw)
        given = {} if topk_ids is None else {"topk_ids": topk_ids[r0:r1], "risk": risk[r0:r1]}
        terms, g = row_terms_and_grad(
            s, a, b, harmful[r0:r1], params=params, scale=scale, want_grad=need_dh or need_dw, **given
        )
        del a, b, s
        store_rows(out, terms, r0, r1)
        if need_dh:
            out["grad_hidden"][r0:r1] = _grad_hidden(g, sw)
        if need_dw:
            out["grad_weight"].addmm_(g.T, sh[r0:r1].to(wide))
        del terms, g
    return out
