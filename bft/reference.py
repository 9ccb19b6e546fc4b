"""The BFT math, written once, in plain PyTorch.

Everything else in bft (the chunked torch backend, the Triton kernels, the analysis and the decoding code)
either calls these functions or is tested against them.

Notation, per row n (one token position), with the three models' logits over a vocabulary of size V:

    s = student logits,  a = aligned logits,  b = base logits          (all in fp32 or wider)
    Δ = b − a                                                          preference difference (Algorithm 1)
    t = λ·a + (1 − λ)·b                                                hybrid teacher (Eq. 12), λ may be > 1
    KL_n = τ²·KL(softmax(t/τ) ‖ softmax(s/τ))      kl="forward"        (Eq. 14, see below)
         = τ²·KL(softmax(s/τ) ‖ softmax(t/τ))      kl="reverse"
    M_n  = TopK(Δ, k)                                                  base-favored ids (Algorithm 1), selection="vocab"
         = TopK(Δ restricted to Plaus_p(b), k)                         selection="base_topp" (see below)
    completion_n = l2_reg·Σ_{v∈M_n} s_v²                               completion="l2": Eq. 9 (on the student)
                 = Σ_{v∈M_n} π_s(v)                                    completion="mass", π_s = softmax(s)
                 = −log(1 − Σ_{v∈M_n} π_s(v))                          completion="unlikelihood"
                 = max(0, log Σ_{v∈M_n} π_s(v) − log p_floor)          completion="log_mass", p_floor = completion_floor
    risk_n = |{v : log_softmax(b)_v > log_softmax(a)_v}| / V           base-favored density (Eq. 6, 10)
    α_n = alpha_base·(1 + γ·risk_n)                                    adaptive strength (Eq. 11), a constant
    loss = Σ_{n valid} (kl_weight·KL_n + harmful_n·α_n·completion_n) / max(1, #valid)

kl_weight (default 1) weighs the distillation term in the loss and its gradient only; the reported per-row ``kl``
stays the unweighted KL_n. kl_weight = 0 is the "completion only" ablation (no distillation).

Direction of the KL. The paper's Eq. 14 writes KL(student ‖ teacher), but temperature-scaled distillation is
almost always implemented as ``F.kl_div(log_softmax(s/τ), softmax(t/τ))``, which is KL(teacher ‖ student):
the mass-covering direction that makes the student match every mode of the teacher. We default to that
(``kl="forward"``) and offer the paper's literal formula as ``kl="reverse"``.

Completion terms (:data:`COMPLETION_TERMS`). "l2" is Eq. 9 as written and the default; its gradient 2·l2_reg·s_v
pulls every s_v towards 0, so it *raises* a negative logit. "mass" and "unlikelihood" lower the student's
probability on M and are unchanged when a constant is added to a row of s (π_s is temperature 1, whatever τ is);
l2_reg scales "l2" only (it brings Σ s_v² ~ 10³-10⁴ to order 1), the other two are O(1) and weighted by α_n alone.
With P = Σ_{v∈M} π_s(v) and Q = 1 − P = Σ_{v∉M} π_s(v), their gradients are

    mass:          ∂/∂s_j = π_s(j)·(1[j∈M] − P)        = π_s(j)·Q on M,  −P·π_s(j) off M
    unlikelihood:  ∂/∂s_j = π_s(j)·(1[j∈M] − P)/Q      = π_s(j)   on M,  −P·π_s(j)/Q off M

"unlikelihood" is computed as logsumexp(s) − logsumexp_{v∉M}(s), which is exact however close P is to 1; it is
infinite when M is the whole vocabulary, so it needs k < V.

Both gradients are proportional to P, so they vanish where the student already puts little mass on M (on a real
model P ~ 1e-4, docs/loss.md#completion-terms). "log_mass" is the hinge c = max(0, log P − log p_floor), with
log P = logsumexp_{v∈M}(s) − logsumexp(s) and p_floor = completion_floor (default 1e-6):

    log_mass:      ∂/∂s_j = 1[c > 0]·(1[j∈M]·softmax(s_M)_j − π_s(j))  = 1[c > 0]·softmax(s_M)_j·Q on M,
                                                                         −1[c > 0]·π_s(j) off M

an O(1) gradient however small P is, until P falls below p_floor, where the term and its gradient are 0 (at exactly
c = 0 the subgradient 0 is used). It is unchanged by a constant added to a row, like the other two softmax terms.

Where M is chosen (:data:`SELECTION_RULES`). "vocab" ranks the whole vocabulary by Δ, as Algorithm 1 does; on a
real pair that is mostly tokens neither model would sample. "base_topp" ranks only the tokens the base model finds
plausible: with the base's tokens in descending π_b order (equal logits: lower id first),

    Plaus_p(b) = the first max(k, n_p) tokens,  n_p = #{r : Σ_{r' < r} π_b(r') < p}   (the top-p nucleus, p =
                 selection_top_p: every token whose preceding mass is below p, so the one that crosses p is in)

grown to k tokens in π_b order when the nucleus is smaller, so M always has k ids and every id of M is plausible.
risk counts over the whole vocabulary under either rule.

Ties in Δ at the k-th place: the lower vocabulary id wins (a stable descending sort). Every backend follows the
same rule, so ``topk_ids`` is deterministic and comparable across backends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bft.kernels.params import (  # the settings every backend shares
    COMPLETION_TERMS,
    DEFAULT_COMPLETION_FLOOR,
    DEFAULT_SELECTION_TOP_P,
    KL_DIRECTIONS,
    SELECTION_RULES,
    BFTLossParams,
)


def hybrid_teacher_logits(aligned_logits: torch.Tensor, base_logits: torch.Tensor, teacher_lambda: float = 1.2):
    """Hybrid teacher of Eq. 12: ``t = λ·a + (1 − λ)·b``, computed in fp32 (or wider if the inputs are wider).

    With λ > 1 the teacher extrapolates past the aligned model, away from the base model.
    """
    if aligned_logits.shape != base_logits.shape:
        raise ValueError(
            f"aligned_logits {tuple(aligned_logits.shape)} and base_logits {tuple(base_logits.shape)} differ in shape"
        )
    dtype = torch.promote_types(torch.promote_types(aligned_logits.dtype, base_logits.dtype), torch.float32)
    a = aligned_logits.to(dtype)
    b = base_logits.to(dtype)
    return teacher_lambda * a + (1.0 - teacher_lambda) * b


def topk_lowest_id_ties(values: torch.Tensor, k: int) -> torch.Tensor:
    """Ids of the k largest entries along the last dim; equal values are ranked by lower id first.

    ``torch.topk`` does not specify its order for ties; a stable descending sort does.
    """
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices
    return order[..., :k]


def topk_mask_lowest_id_ties(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The set :func:`topk_lowest_id_ties` picks, as a boolean mask, found in linear time instead of a full sort.

    The k-th largest value of each row (``torch.topk``) splits it: every entry above it is in, and of the entries
    equal to it the lowest ids fill the remaining places. Returns ``(mask, kth)`` with ``kth`` [..., 1]. A row holding
    NaN has a NaN ``kth`` (topk ranks NaN highest) and an undefined mask: fall back to :func:`topk_lowest_id_ties`.
    """
    kth = torch.topk(values, k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above = values > kth
    tied = values == kth
    room = k - above.sum(-1, keepdim=True)  # >= 1: the k-th value is tied with itself
    return above | (tied & (tied.cumsum(-1) <= room)), kth


def plausible_to_base(base_logits: torch.Tensor, top_p: float, k: int) -> torch.Tensor:
    """Plaus_p(b) of the module docstring as a boolean mask [..., V]: the base model's top-p nucleus (tokens in
    descending π_b order, equal logits lower id first, kept while the mass before them is < p), grown in that order
    to at least k tokens. Computed in the logits' dtype (fp32 or wider)."""
    order = torch.sort(base_logits, dim=-1, descending=True, stable=True).indices
    p_sorted = torch.softmax(base_logits, dim=-1).gather(-1, order)
    cum = torch.cumsum(p_sorted, dim=-1)
    before = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], dim=-1)  # the mass ranked above each token
    n_p = (before < top_p).sum(-1, keepdim=True)
    size = n_p.clamp(min=k)
    ranks = torch.arange(base_logits.shape[-1], device=base_logits.device)
    keep_sorted = ranks < size
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def select_base_favored(
    delta: torch.Tensor,
    base_logits: torch.Tensor,
    k: int,
    selection: str = "vocab",
    top_p: float = DEFAULT_SELECTION_TOP_P,
) -> torch.Tensor:
    """M: the ids [..., k] of the k largest Δ = b − a (ties to the lower id) among the tokens ``selection`` allows:
    all of them ("vocab") or :func:`plausible_to_base` ("base_topp"). Ranked by (allowed, Δ, −id), so a plausible
    token always outranks an implausible one, whatever Δ holds (also ±inf)."""
    if selection == "vocab":
        return topk_lowest_id_ties(delta, k)
    if selection != "base_topp":
        raise ValueError(f"selection must be one of {SELECTION_RULES}, got {selection!r}")
    allowed = plausible_to_base(base_logits, top_p, k)
    by_delta = torch.sort(delta, dim=-1, descending=True, stable=True).indices
    first = torch.sort(allowed.gather(-1, by_delta).to(torch.int8), dim=-1, descending=True, stable=True).indices
    return by_delta.gather(-1, first[..., :k])


def base_favored_density(count: torch.Tensor, V: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """risk = count / V (Eq. 10), correctly rounded to ``dtype`` on every device.

    On CUDA, torch divides by a Python number by multiplying with its reciprocal, which can land 1 ulp off the
    quotient. count and V are integers below 2**24, so count / V is never within fp64 rounding of an fp32 halfway
    point: computed in fp64 and rounded once, it is the correctly rounded fp32 value on CPU and CUDA alike.
    """
    return (count.to(torch.float64) / V).to(dtype)


@dataclass
class BaseFavoredTokens:
    """Result of :func:`base_favored_tokens`.

    ids:   [..., k] int64, the top-k ids of base − aligned logits (Algorithm 1), ties to the lower id.
    count: [...] int64, |B| = #{v : log_softmax(base)_v > log_softmax(aligned)_v} (Eq. 6).
    delta: [..., k] fp32, base − aligned logits at ``ids``.
    """

    ids: torch.Tensor
    count: torch.Tensor
    delta: torch.Tensor


def base_favored_tokens(
    *,
    aligned_logits: torch.Tensor,
    base_logits: torch.Tensor,
    top_k: int = 100,
    selection: str = "vocab",
    selection_top_p: float = DEFAULT_SELECTION_TOP_P,
) -> BaseFavoredTokens:
    """Base-favored tokens of Algorithm 1 and their count (Eq. 6), over the last dim of [..., V] logits.

    ``ids`` are the top-``top_k`` of Δ = base − aligned *logits* (Algorithm 1, as in the paper), over the whole
    vocabulary (``selection="vocab"``) or the base model's plausible tokens (``"base_topp"``,
    :func:`select_base_favored`); ``count`` uses
    *probabilities*: v is base-favored when π_base(v) > π_aligned(v), i.e. log_softmax(base)_v >
    log_softmax(aligned)_v. Accumulates in fp32 whatever the input dtype.
    """
    k = top_k
    if base_logits.shape != aligned_logits.shape:
        raise ValueError(
            f"base_logits {tuple(base_logits.shape)} and aligned_logits {tuple(aligned_logits.shape)} differ in shape"
        )
    if base_logits.dim() < 1 or base_logits.shape[-1] < 1:
        raise ValueError(f"logits need a non-empty vocabulary dim, got shape {tuple(base_logits.shape)}")
    V = base_logits.shape[-1]
    if not 1 <= k <= V:
        raise ValueError(f"top_k={k} must be in [1, V={V}]")
    dtype = torch.promote_types(base_logits.dtype, torch.float32)
    b = base_logits.to(dtype)
    a = aligned_logits.to(dtype)
    delta = b - a
    ids = select_base_favored(delta, b, k, selection, selection_top_p)
    count = (torch.log_softmax(b, dim=-1) > torch.log_softmax(a, dim=-1)).sum(-1)
    return BaseFavoredTokens(ids=ids, count=count, delta=torch.gather(delta, -1, ids))


@dataclass
class BFTRowTerms:
    """Per-row terms of the objective (see the module docstring). ``row_loss`` is differentiable in ``s``."""

    kl: torch.Tensor  # [N]
    completion: torch.Tensor  # [N]
    risk: torch.Tensor  # [N]
    alpha: torch.Tensor  # [N]
    topk_ids: torch.Tensor  # [N, k]
    row_loss: torch.Tensor  # [N] = kl_weight·kl + harmful·alpha·completion


def completion_values(
    s: torch.Tensor,
    ids: torch.Tensor,
    *,
    completion: str = "l2",
    l2_reg: float = 1.0,
    completion_floor: float = DEFAULT_COMPLETION_FLOOR,
):
    """The completion term of each row of wide [N, V] logits s on the ids ``ids`` [N, k] (M), differentiable in s.

    With M = the k ids of a row and softmax at temperature 1::

        "l2"            l2_reg·Σ_{v∈M} s_v²                  (Eq. 9 as written)
        "mass"          Σ_{v∈M} softmax(s)_v
        "unlikelihood"  −log(1 − Σ_{v∈M} softmax(s)_v) = logsumexp(s) − logsumexp_{v∉M}(s)   (needs k < V)
        "log_mass"      max(0, logsumexp_{v∈M}(s) − logsumexp(s) − log completion_floor)
                        (relu: the subgradient at exactly 0 is 0)
    """
    if completion == "l2":
        return l2_reg * torch.gather(s, -1, ids).square().sum(-1)
    if completion == "mass":
        return torch.gather(torch.softmax(s, dim=-1), -1, ids).sum(-1)
    if completion == "unlikelihood":
        rest = s.scatter(-1, ids, float("-inf"))  # s with M removed
        return torch.logsumexp(s, dim=-1) - torch.logsumexp(rest, dim=-1)
    if completion == "log_mass":
        log_p = torch.logsumexp(torch.gather(s, -1, ids), dim=-1) - torch.logsumexp(s, dim=-1)
        return torch.relu(log_p - math.log(completion_floor))
    raise ValueError(f"completion must be one of {COMPLETION_TERMS}, got {completion!r}")


def bft_row_terms(
    s: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    harmful: torch.Tensor,
    *,
    top_k: int,
    temperature: float,
    teacher_lambda: float,
    alpha_base: float,
    gamma: float,
    l2_reg: float,
    kl: str,
    topk_ids: torch.Tensor | None = None,
    risk: torch.Tensor | None = None,
    kl_weight: float = 1.0,
    completion: str = "l2",
    selection: str = "vocab",
    selection_top_p: float = DEFAULT_SELECTION_TOP_P,
    completion_floor: float = DEFAULT_COMPLETION_FLOOR,
) -> BFTRowTerms:
    """The objective's per-row terms from full-vocabulary logits s, a, b of shape [N, V] (already wide dtype).

    a and b are constants (no gradient); gradients flow to s only. α_n is detached (Eq. 11 is a weight).
    ``topk_ids`` [N, k] and ``risk`` [N], when given (both or neither), are M_n and risk_n computed beforehand from
    the same a and b (a teacher cache); they replace the top-k of Δ and the count, and nothing else changes.
    ``kl_weight`` scales KL_n in ``row_loss`` only; ``kl`` is reported unweighted. ``completion`` names the
    completion term (:func:`completion_values`; ``completion_floor`` is "log_mass"'s p_floor); ``selection`` /
    ``selection_top_p`` where M is chosen (:func:`select_base_favored`; not read when ``topk_ids`` is given).
    """
    tau = float(temperature)
    a = a.detach()
    b = b.detach()
    V = s.shape[-1]
    t = hybrid_teacher_logits(a, b, teacher_lambda).to(s.dtype)
    log_ps = torch.log_softmax(s / tau, dim=-1)
    log_pt = torch.log_softmax(t / tau, dim=-1)
    if kl == "forward":  # KL(teacher ‖ student)
        kl_n = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    elif kl == "reverse":  # KL(student ‖ teacher), Eq. 14 as written
        kl_n = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    else:
        raise ValueError(f"kl must be one of {KL_DIRECTIONS}, got {kl!r}")
    kl_n = kl_n * tau * tau

    if topk_ids is None:
        favored = base_favored_tokens(
            aligned_logits=a, base_logits=b, top_k=top_k, selection=selection, selection_top_p=selection_top_p
        )
        ids = favored.ids
        risk = base_favored_density(favored.count, V, s.dtype)
    else:
        ids = topk_ids.long()
        risk = risk.detach().to(s.dtype)
    alpha = (alpha_base * (1.0 + gamma * risk)).detach()
    completion_n = completion_values(s, ids, completion=completion, l2_reg=l2_reg, completion_floor=completion_floor)
    row_loss = kl_weight * kl_n + harmful.to(s.dtype) * alpha * completion_n
    return BFTRowTerms(kl=kl_n, completion=completion_n, risk=risk, alpha=alpha, topk_ids=ids, row_loss=row_loss)


def bft_loss_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    aligned_hidden: torch.Tensor,
    aligned_weight: torch.Tensor,
    base_hidden: torch.Tensor,
    base_weight: torch.Tensor,
    *,
    harmful: torch.Tensor,
    valid: torch.Tensor,
    params: BFTLossParams | None = None,
    compute_dtype: torch.dtype = torch.float32,
    topk_ids: torch.Tensor | None = None,
    risk: torch.Tensor | None = None,
    **settings,
):
    """The whole objective on full [N, V] logits, differentiable through autograd. The test oracle.

    Logits are ``h.to(compute_dtype) @ W.to(compute_dtype).T``. fp32 (the default) is what every backend
    must match; tests also run it in fp64 (the truth) and in bf16 (what naive same-dtype torch would do).
    Returns ``(loss, BFTRowTerms)``; invalid rows report kl = completion = risk = alpha = 0 and topk_ids = −1.
    ``topk_ids`` [N, k] / ``risk`` [N]: given base-favored ids and density (see :func:`bft_row_terms`); their
    values on invalid rows are not read. The objective's settings: ``params`` (a :class:`BFTLossParams`), or its
    fields as keywords (``top_k=7, temperature=2.0, ...``; missing ones take its defaults). Tensors are assumed
    validated (see :func:`bft.loss.bft_loss`).
    """
    if params is None:
        params = BFTLossParams(**settings)
    elif settings:
        raise ValueError(f"pass params= or the settings as keywords, not both (got params and {sorted(settings)})")
    cd = compute_dtype
    s = student_hidden.to(cd) @ student_weight.to(cd).T
    with torch.no_grad():
        a = aligned_hidden.detach().to(cd) @ aligned_weight.detach().to(cd).T
        b = base_hidden.detach().to(cd) @ base_weight.detach().to(cd).T
    terms = bft_row_terms(
        s,
        a,
        b,
        harmful,
        **params.as_kwargs(),
        topk_ids=None if topk_ids is None else torch.where(valid[:, None], topk_ids.long(), 0),
        risk=None if risk is None else torch.where(valid, risk, 0),
    )
    v = valid.to(s.dtype)
    n_valid = valid.sum().clamp(min=1).to(s.dtype)
    loss = (terms.row_loss * v).sum() / n_valid
    masked = mask_rows(terms, valid)
    return loss, masked


def mask_rows(terms: BFTRowTerms, valid: torch.Tensor) -> BFTRowTerms:
    """Detach per-row diagnostics and zero them on invalid rows (topk_ids = −1 there)."""
    keep = valid.to(torch.bool)
    z = lambda x: torch.where(keep, x.detach(), torch.zeros_like(x.detach()))  # noqa: E731
    ids = torch.where(keep[:, None], terms.topk_ids, torch.full_like(terms.topk_ids, -1))
    return BFTRowTerms(
        kl=z(terms.kl),
        completion=z(terms.completion),
        risk=z(terms.risk),
        alpha=z(terms.alpha),
        topk_ids=ids,
        row_loss=z(terms.row_loss),
    )
