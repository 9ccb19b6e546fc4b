"""Kernel 2 of the BFT loss: everything per row, streamed over vocabulary chunks of the fp32 logits of kernel 1.

One program owns one row n and makes two passes over its V logits s, a, b (fp32, from :mod:`bft.kernels.bft_logits`):

Pass 1 — online log-sum-exp of s/τ, t/τ, a and b (t = λa + (1−λ)b), the KL numerator
    u = Σ_v e^{t_v/τ − m_t}(t_v − s_v)/τ  (forward; reverse swaps s and t), rescaled as the running max m moves,
and a running top-k of Δ = b − a over packed int64 keys ``ordered_bits(Δ) << 31 | (2³¹−1 − v)``: one integer
comparison orders by Δ and, for equal Δ, by the lower id — the reference's tie rule — and keys are unique. The k
best keys live unordered in registers; a chunk key that beats the current k-th best replaces it (a chunk with none
costs one max-reduction). The driver sorts the k keys of each row afterwards ([n, k], negligible).

Pass 2 — with the final log-sum-exps: the base-favored count #{v : b_v − lse_b > a_v − lse_a} (Eq. 6) and the
gradient of the row's loss w.r.t. the student logits, pre-multiplied by ``grad_scale`` (1/#valid):
    forward KL:  ∂/∂s_v = τ (p_s,v − p_t,v)
    reverse KL:  ∂/∂s_v = τ p_s,v (log p_s,v − log p_t,v − KL_n/τ²)
both times ``kl_weight`` (the weight of KL_n in row_loss; the stored ``kl`` is unweighted).
Then the L2 completion term touches only the k top ids: completion = l2·Σ_{v∈M} s_v² and, for harmful rows,
∂/∂s_v += 2·l2·α_n·s_v at those ids — a sparse read-modify-write after a barrier, not another dense pass.

The softmax completion terms (``COMPLETION`` 1 = "mass" P = Σ_{v∈M} π_v, 2 = "unlikelihood" −log(1 − P), with
π = softmax(s) at temperature 1) need lse(s) and the complement's mass Q = 1 − P, known only after M is. So once
pass 1 has found M, the kernel keeps s at M in registers and writes −inf there in the row; pass 2 then computes
the count and the online log-sum-exp over the complement of M (exact, with no 1 − P cancellation), and P, Q and
lse(s) follow from it and the k kept values. α_n needs the count, so a pass 3 writes the gradient: the KL's plus
the completion term's off M, −P·π_j ("mass") or −P·q_j ("unlikelihood", q = softmax over the complement), both
times harmful_n·α_n; then the k lanes of M are overwritten with the KL gradient of the kept s plus π_j·Q ("mass")
or π_j ("unlikelihood"), and s is restored at M. Without a gradient there is no pass 3.

``COMPLETION`` 3 = "log_mass", c = max(0, log P − log p_floor) with log P = lse(s_M) − lse(s) (``log_floor`` =
log p_floor), runs the same passes: its gradient is 1[c > 0]·(−π_j) off M (pass 3) and 1[c > 0]·softmax(s_M)_j·Q on
M (= softmax(s_M)_j − π_j, without the cancellation), both times harmful_n·α_n; 0 at exactly c = 0.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .params import BFTLossParams

MAX_ID = 2**31 - 1


@triton.jit
def _packed_keys(delta, offs, mask):
    """int64 keys ordered like (Δ descending, id ascending); −1 on masked lanes (below every real key)."""
    bits = (delta + 0.0).to(tl.int32, bitcast=True)  # + 0.0 turns −0.0 into +0.0 so they tie, as in torch
    ordered = tl.where(bits < 0, ~bits, bits | -2147483648).to(tl.uint32, bitcast=True).to(tl.int64)
    key = (ordered << 31) | (2147483647 - offs.to(tl.int64))
    return tl.where(mask, key, -1)


@triton.jit
def _kl_grad(s, a, b, inv_tau, tau, lam, lse_s, lse_t, kl_raw, REVERSE: tl.constexpr):
    """∂KL_n/∂s_v (unscaled): τ(p_s − p_t) forward, τ·p_s·(log p_s − log p_t − KL/τ²) reverse."""
    log_ps = s * inv_tau - lse_s
    log_pt = (lam * a + (1.0 - lam) * b) * inv_tau - lse_t
    p_s = tl.exp(log_ps)
    if REVERSE:
        g = tau * p_s * (log_ps - log_pt - kl_raw)
    else:
        g = tau * (p_s - tl.exp(log_pt))
    return g


@triton.jit
def _bft_rows_kernel(
    s_ptr,
    a_ptr,
    b_ptr,
    g_ptr,
    harmful_ptr,
    ids_in_ptr,
    risk_in_ptr,
    kl_ptr,
    completion_ptr,
    count_ptr,
    risk_ptr,
    alpha_ptr,
    row_loss_ptr,
    keys_ptr,
    stride_logits,
    stride_g,
    V,
    inv_tau,
    tau,
    lam,
    alpha_base,
    gamma,
    l2_reg,
    log_floor,
    kl_weight,
    grad_scale,
    K: tl.constexpr,
    K_PAD: tl.constexpr,
    BV: tl.constexpr,
    REVERSE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    GIVEN: tl.constexpr,
    COMPLETION: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_logits
    a_row = a_ptr + row * stride_logits
    b_row = b_ptr + row * stride_logits
    NEG_INF: tl.constexpr = float("-inf")

    # ---- pass 1: online log-sum-exps, KL numerator, running top-k of Δ --------------------------------------
    m_s = tl.full((), NEG_INF, tl.float32)
    m_t = tl.full((), NEG_INF, tl.float32)
    m_a = tl.full((), NEG_INF, tl.float32)
    m_b = tl.full((), NEG_INF, tl.float32)
    l_s = tl.zeros((), tl.float32)
    l_t = tl.zeros((), tl.float32)
    l_a = tl.zeros((), tl.float32)
    l_b = tl.zeros((), tl.float32)
    u = tl.zeros((), tl.float32)
    kpos = tl.arange(0, K_PAD)
    if not GIVEN:
        # the k best keys so far, unordered; lanes ≥ K hold INT64_MAX so that min(top) is the k-th best (−1 = empty)
        top = tl.where(kpos < K, -1, 9223372036854775807)
        kth = tl.min(top, 0)
    for v0 in range(0, V, BV):
        offs = v0 + tl.arange(0, BV)
        mask = offs < V
        s = tl.load(s_row + offs, mask=mask, other=0.0)
        a = tl.load(a_row + offs, mask=mask, other=0.0)
        b = tl.load(b_row + offs, mask=mask, other=0.0)
        zs = s * inv_tau
        zt = (lam * a + (1.0 - lam) * b) * inv_tau
        m_s_new = tl.maximum(m_s, tl.max(tl.where(mask, zs, NEG_INF), 0))
        m_t_new = tl.maximum(m_t, tl.max(tl.where(mask, zt, NEG_INF), 0))
        e_s = tl.where(mask, tl.exp(zs - m_s_new), 0.0)
        e_t = tl.where(mask, tl.exp(zt - m_t_new), 0.0)
        if REVERSE:
            u = u * tl.exp(m_s - m_s_new) + tl.sum(e_s * (zs - zt), 0)
        else:
            u = u * tl.exp(m_t - m_t_new) + tl.sum(e_t * (zt - zs), 0)
        l_s = l_s * tl.exp(m_s - m_s_new) + tl.sum(e_s, 0)
        l_t = l_t * tl.exp(m_t - m_t_new) + tl.sum(e_t, 0)
        m_s = m_s_new
        m_t = m_t_new
        if not GIVEN:  # given ids and risk (a teacher cache): no log-sum-exps of a and b, no running top-k
            m_a_new = tl.maximum(m_a, tl.max(tl.where(mask, a, NEG_INF), 0))
            m_b_new = tl.maximum(m_b, tl.max(tl.where(mask, b, NEG_INF), 0))
            l_a = l_a * tl.exp(m_a - m_a_new) + tl.sum(tl.where(mask, tl.exp(a - m_a_new), 0.0), 0)
            l_b = l_b * tl.exp(m_b - m_b_new) + tl.sum(tl.where(mask, tl.exp(b - m_b_new), 0.0), 0)
            m_a = m_a_new
            m_b = m_b_new

            # running top-k: insert the chunk's keys that beat the current k-th best, one at a time (expected
            # k·(1 + ln(V/k)) insertions per row over the whole vocabulary; chunks with none cost one max)
            keys = _packed_keys(b - a, offs, mask)
            cand = tl.where(keys > kth, keys, -1)
            best = tl.max(cand, 0)
            while best > kth:
                slot = tl.min(tl.where(top == kth, kpos, K_PAD), 0)  # the lane holding the current k-th best
                top = tl.where(kpos == slot, best, top)
                kth = tl.min(top, 0)
                cand = tl.where(cand == best, -1, cand)
                best = tl.max(cand, 0)

    lse_s = m_s + tl.log(l_s)
    lse_t = m_t + tl.log(l_t)
    if not GIVEN:
        lse_a = m_a + tl.log(l_a)
        lse_b = m_b + tl.log(l_b)
    if REVERSE:
        kl_raw = u / l_s - (lse_s - lse_t)
    else:
        kl_raw = u / l_t - (lse_t - lse_s)

    # ---- the k base-favored ids M (known from here on) ---------------------------------------------------------
    kmask = kpos < K
    if GIVEN:
        ids = tl.load(ids_in_ptr + row * K + kpos, mask=kmask, other=0).to(tl.int64)
    else:
        ids = tl.where(kmask, 2147483647 - (top & 2147483647), 0)  # unordered; the driver sorts the k keys
    s_top = tl.load(s_row + ids, mask=kmask, other=0.0)
    if COMPLETION != 0:
        # softmax terms: s at M is kept in registers and hidden in the row (−inf) until the end, so that pass 2's
        # log-sum-exp is over the complement of M exactly (no 1 − P cancellation) and pass 3 sees s = −inf there
        tl.debug_barrier()  # pass 1's loads of the row are done
        tl.store(s_row + ids, tl.full((K_PAD,), NEG_INF, tl.float32), mask=kmask)
        tl.debug_barrier()

    # ---- pass 2: base-favored count; the dense KL gradient ("l2") or lse over the complement of M (softmax) --
    count = tl.zeros((), tl.int32)
    m_c = tl.full((), NEG_INF, tl.float32)
    l_c = tl.zeros((), tl.float32)
    g_row = g_ptr + row * stride_g
    kl_grad_scale = kl_weight * grad_scale  # exactly grad_scale at kl_weight = 1
    for v0 in range(0, V, BV):
        offs = v0 + tl.arange(0, BV)
        mask = offs < V
        if not GIVEN:
            a = tl.load(a_row + offs, mask=mask, other=0.0)
            b = tl.load(b_row + offs, mask=mask, other=0.0)
            count += tl.sum((mask & ((b - lse_b) > (a - lse_a))).to(tl.int32), 0)
        if COMPLETION == 0:
            if WRITE_GRAD:
                if GIVEN:
                    a = tl.load(a_row + offs, mask=mask, other=0.0)
                    b = tl.load(b_row + offs, mask=mask, other=0.0)
                s = tl.load(s_row + offs, mask=mask, other=0.0)
                g = _kl_grad(s, a, b, inv_tau, tau, lam, lse_s, lse_t, kl_raw, REVERSE)
                tl.store(g_row + offs, (g * kl_grad_scale).to(g_ptr.dtype.element_ty), mask=mask)
        else:
            s = tl.load(s_row + offs, mask=mask, other=NEG_INF)  # −inf on M and past V
            m_c_new = tl.maximum(m_c, tl.max(s, 0))
            keep = s > NEG_INF
            shift = tl.where(m_c_new > NEG_INF, m_c_new, 0.0)  # all −inf so far: nothing to rescale
            l_c = l_c * tl.exp(m_c - shift) + tl.sum(tl.where(keep, tl.exp(s - shift), 0.0), 0)
            m_c = m_c_new

    if GIVEN:
        risk = tl.load(risk_in_ptr + row)
        count = count - 1  # not counted
    else:
        risk = (count.to(tl.float64) / V).to(tl.float32)  # correctly rounded, as bft.reference.base_favored_density
    alpha = alpha_base * (1.0 + gamma * risk)
    harmful = tl.load(harmful_ptr + row).to(tl.float32)
    weight = harmful * alpha  # harmful_n·α_n

    # ---- the completion term on M and its gradient --------------------------------------------------------------
    if COMPLETION == 0:  # "l2": l2·Σ_{v∈M} s_v², gradient 2·l2·s_v on the k ids only (a sparse read-modify-write)
        completion = l2_reg * tl.sum(s_top * s_top, 0)
        if WRITE_GRAD:
            tl.debug_barrier()  # the dense stores above must land before we add to k of them
            g_old = tl.load(g_row + ids, mask=kmask, other=0.0).to(tl.float32)
            g_new = g_old + (2.0 * l2_reg * grad_scale) * weight * s_top
            tl.store(g_row + ids, g_new.to(g_ptr.dtype.element_ty), mask=kmask)
    else:
        # P = Σ_{v∈M} π_v and Q = 1 − P from log-sum-exps over M (registers) and over its complement (pass 2)
        lse_c = m_c + tl.log(tl.maximum(l_c, 1e-30))  # l_c ≥ 1 unless M is the whole vocabulary: then −inf
        m_m = tl.max(tl.where(kmask, s_top, NEG_INF), 0)
        lse_m = m_m + tl.log(tl.sum(tl.where(kmask, tl.exp(s_top - m_m), 0.0), 0))
        m_all = tl.maximum(lse_m, lse_c)
        lse = m_all + tl.log(tl.exp(lse_m - m_all) + tl.exp(lse_c - m_all))  # lse(s), temperature 1
        P = tl.exp(lse_m - lse)
        Q = tl.exp(lse_c - lse)
        if COMPLETION == 1:  # "mass": P
            completion = P
        elif COMPLETION == 2:  # "unlikelihood": −log Q
            completion = lse - lse_c
        else:  # "log_mass": max(0, log P − log p_floor); its gradient is on only where c > 0 (0 at c = 0)
            completion = tl.maximum(lse_m - lse - log_floor, 0.0)
            hinge = (completion > 0.0).to(tl.float32)
        if WRITE_GRAD:
            # pass 3: KL gradient plus the completion term's off M: −P·π_j ("mass"), −P·q_j ("unlikelihood", q the
            # softmax over the complement), −1[c > 0]·π_j ("log_mass"); s = −inf on M, so those lanes get junk that
            # the sparse store replaces
            c_scale = grad_scale * weight
            if COMPLETION == 3:
                c_scale = c_scale * hinge
            for v0 in range(0, V, BV):
                offs = v0 + tl.arange(0, BV)
                mask = offs < V
                s = tl.load(s_row + offs, mask=mask, other=0.0)
                a = tl.load(a_row + offs, mask=mask, other=0.0)
                b = tl.load(b_row + offs, mask=mask, other=0.0)
                s_kl = tl.where(s > NEG_INF, s, 0.0)  # finite junk on M (0·inf would be NaN in the reverse KL)
                g = _kl_grad(s_kl, a, b, inv_tau, tau, lam, lse_s, lse_t, kl_raw, REVERSE) * kl_grad_scale
                if COMPLETION == 1:
                    g = g - (c_scale * P) * tl.exp(s - lse)
                elif COMPLETION == 2:
                    g = g - (c_scale * P) * tl.exp(s - lse_c)
                else:
                    g = g - c_scale * tl.exp(s - lse)
                tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
            tl.debug_barrier()  # pass 3's stores (and loads of the row) are done before M's lanes are rewritten
            # on M: the KL gradient from the kept s, plus π_j·Q ("mass"), π_j ("unlikelihood") or
            # 1[c > 0]·softmax(s_M)_j·Q ("log_mass")
            a_top = tl.load(a_row + ids, mask=kmask, other=0.0)
            b_top = tl.load(b_row + ids, mask=kmask, other=0.0)
            g_top = _kl_grad(s_top, a_top, b_top, inv_tau, tau, lam, lse_s, lse_t, kl_raw, REVERSE) * kl_grad_scale
            if COMPLETION == 1:
                g_top = g_top + c_scale * tl.exp(s_top - lse) * Q
            elif COMPLETION == 2:
                g_top = g_top + c_scale * tl.exp(s_top - lse)
            else:
                g_top = g_top + c_scale * tl.exp(s_top - lse_m) * Q
            tl.store(g_row + ids, g_top.to(g_ptr.dtype.element_ty), mask=kmask)
        else:
            tl.debug_barrier()  # pass 2's loads of the row are done before M's lanes are restored
        tl.store(s_row + ids, s_top, mask=kmask)  # the row as it was given

    kl = kl_raw * tau * tau
    if not GIVEN:
        tl.store(keys_ptr + row * K + kpos, top, mask=kmask)
    tl.store(kl_ptr + row, kl)
    tl.store(completion_ptr + row, completion)
    tl.store(count_ptr + row, count)
    tl.store(risk_ptr + row, risk)
    tl.store(alpha_ptr + row, alpha)
    tl.store(row_loss_ptr + row, kl_weight * kl + weight * completion)


def row_block_sizes(V: int, top_k: int, device: torch.device) -> tuple[int, int]:
    """(BV, K_PAD): K_PAD = next power of two ≥ k; BV a multiple of K_PAD (the merge folds BV onto K_PAD)."""
    k_pad = triton.next_power_of_2(top_k)
    if device.type == "cuda":
        bv = 2048
    else:  # interpreter: one or few chunks per row
        bv = min(8192, triton.next_power_of_2(V))
    return max(bv, k_pad), k_pad


def bft_rows(S, A, B, G, harmful, *, params, grad_scale, topk_ids=None, risk=None) -> dict:
    """Run kernel 2 on fp32 logit blocks S, A, B of shape [n, V]; writes d(loss)/d(s)·grad_scale into G
    (any float dtype, [n, V]) unless G is None. Returns per-row kl, completion, count, risk, alpha, row_loss,
    topk_ids. ``params``: the objective's settings (:class:`bft.kernels.params.BFTLossParams`); ``kl_weight``
    scales KL_n in row_loss and its gradient, ``kl`` is returned unweighted. ``params.completion`` selects the
    compiled completion term; the softmax terms ("mass", "unlikelihood", "log_mass") write −inf into S at M while
    the kernel runs and restore it.

    ``topk_ids`` [n, top_k] (int32/int64, distinct ids per row) and ``risk`` [n] (fp32), given together: the
    kernel is compiled without the running top-k and the base-favored count (and without the log-sum-exps of a and
    b that the count needs) and uses them; ``count`` is then −1 and ``topk_ids`` / ``risk`` are returned as given.
    """
    if not isinstance(params, BFTLossParams):
        raise ValueError(f"bft_rows: params must be a bft.kernels.params.BFTLossParams, got {type(params).__name__}")
    top_k = params.top_k
    n = S.shape[0]
    dev = S.device
    given = topk_ids is not None
    if given != (risk is not None):
        raise ValueError("bft_rows: pass both topk_ids and risk, or neither")
    out = {
        "kl": torch.empty(n, dtype=torch.float32, device=dev),
        "completion": torch.empty(n, dtype=torch.float32, device=dev),
        "count": torch.empty(n, dtype=torch.int32, device=dev),
        "risk": torch.empty(n, dtype=torch.float32, device=dev),
        "alpha": torch.empty(n, dtype=torch.float32, device=dev),
        "row_loss": torch.empty(n, dtype=torch.float32, device=dev),
        "topk_keys": None if given else torch.empty(n, top_k, dtype=torch.int64, device=dev),
    }
    if given:
        topk_ids = topk_ids.contiguous()
        risk = risk.to(torch.float32).contiguous()
    if n > 0:
        _launch(S, A, B, G, harmful, out, params, grad_scale, topk_ids, risk)
    keys = out.pop("topk_keys")
    if given:
        out["topk_ids"] = topk_ids.long()
        return out
    # order the k ids as the reference does: Δ descending, then id ascending (= packed key descending)
    keys = torch.sort(keys, dim=1, descending=True).values
    out["topk_ids"] = MAX_ID - (keys & MAX_ID)
    return out


def _launch(S, A, B, G, harmful, out, params, grad_scale, topk_ids, risk):
    (n, V), dev, p = S.shape, S.device, params
    BV, K_PAD = row_block_sizes(V, p.top_k, dev)
    write_grad = G is not None
    given = topk_ids is not None
    g = G if write_grad else S  # an unused pointer when no gradient is wanted
    keys = out["topk_keys"] if not given else out["count"]  # unused pointers where the kernel does not touch them
    _bft_rows_kernel[(n,)](
        S,
        A,
        B,
        g,
        harmful,
        topk_ids if given else out["count"],
        risk if given else out["risk"],
        out["kl"],
        out["completion"],
        out["count"],
        out["risk"],
        out["alpha"],
        out["row_loss"],
        keys,
        S.stride(0),
        g.stride(0),
        V,
        1.0 / p.temperature,
        float(p.temperature),
        float(p.teacher_lambda),
        float(p.alpha_base),
        float(p.gamma),
        float(p.l2_reg),
        math.log(p.completion_floor),
        float(p.kl_weight),
        float(grad_scale),
        K=p.top_k,
        K_PAD=K_PAD,
        BV=BV,
        REVERSE=(p.kl == "reverse"),
        WRITE_GRAD=write_grad,
        GIVEN=given,
        COMPLETION=p.completion_code,
        num_warps=8 if dev.type == "cuda" else 1,
    )
