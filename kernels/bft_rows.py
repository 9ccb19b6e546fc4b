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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ID = 2**31 - 1


@triton.jit
def _packed_keys(delta, offs, mask):
    """int64 keys ordered like (Δ descending, id ascending); −1 on masked lanes (below every real key)."""
    bits = (delta + 0.0).to(tl.int32, bitcast=True)  # + 0.0 turns −0.0 into +0.0 so they tie, as in torch
    ordered = tl.where(bits < 0, ~bits, bits | -2147483648).to(tl.uint32, bitcast=True).to(tl.int64)
    key = (ordered << 31) | (2147483647 - offs.to(tl.int64))
    return tl.where(mask, key, -1)


@triton.jit
def _bft_rows_kernel(
    s_ptr, a_ptr, b_ptr, g_ptr, harmful_ptr, ids_in_ptr, risk_in_ptr,
    kl_ptr, completion_ptr, count_ptr, risk_ptr, alpha_ptr, row_loss_ptr, keys_ptr,
    stride_logits, stride_g, V,
    inv_tau, tau, lam, alpha_base, gamma, l2_reg, kl_weight, grad_scale,
    K: tl.constexpr, K_PAD: tl.constexpr, BV: tl.constexpr, REVERSE: tl.constexpr, WRITE_GRAD: tl.constexpr,
    GIVEN: tl.constexpr,
):  # fmt: skip
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

    # ---- pass 2: base-favored count and the dense KL gradient -----------------------------------------------
    count = tl.zeros((), tl.int32)
    g_row = g_ptr + row * stride_g
    kl_grad_scale = kl_weight * grad_scale  # exactly grad_scale at kl_weight = 1
    for v0 in range(0, V, BV):
        offs = v0 + tl.arange(0, BV)
        mask = offs < V
        if not GIVEN:
            a = tl.load(a_row + offs, mask=mask, other=0.0)
            b = tl.load(b_row + offs, mask=mask, other=0.0)
            count += tl.sum((mask & ((b - lse_b) > (a - lse_a))).to(tl.int32), 0)
        if WRITE_GRAD:
            if GIVEN:
                a = tl.load(a_row + offs, mask=mask, other=0.0)
                b = tl.load(b_row + offs, mask=mask, other=0.0)
            s = tl.load(s_row + offs, mask=mask, other=0.0)
            log_ps = s * inv_tau - lse_s
            log_pt = (lam * a + (1.0 - lam) * b) * inv_tau - lse_t
            p_s = tl.exp(log_ps)
            if REVERSE:
                g = tau * p_s * (log_ps - log_pt - kl_raw)
            else:
                g = tau * (p_s - tl.exp(log_pt))
            tl.store(g_row + offs, (g * kl_grad_scale).to(g_ptr.dtype.element_ty), mask=mask)

    # ---- the k base-favored ids: completion term and its sparse gradient ------------------------------------
    kmask = kpos < K
    if GIVEN:
        ids = tl.load(ids_in_ptr + row * K + kpos, mask=kmask, other=0).to(tl.int64)
        risk = tl.load(risk_in_ptr + row)
        count = count - 1  # not counted
    else:
        ids = tl.where(kmask, 2147483647 - (top & 2147483647), 0)  # unordered; the driver sorts the k keys
        risk = (count.to(tl.float64) / V).to(tl.float32)  # correctly rounded, as bft.reference.base_favored_density
    s_top = tl.load(s_row + ids, mask=kmask, other=0.0)
    completion = l2_reg * tl.sum(s_top * s_top, 0)
    alpha = alpha_base * (1.0 + gamma * risk)
    harmful = tl.load(harmful_ptr + row).to(tl.float32)
    if WRITE_GRAD:
        tl.debug_barrier()  # the dense stores above must land before we add to k of them
        g_old = tl.load(g_row + ids, mask=kmask, other=0.0).to(tl.float32)
        g_new = g_old + (2.0 * l2_reg * grad_scale) * harmful * alpha * s_top
        tl.store(g_row + ids, g_new.to(g_ptr.dtype.element_ty), mask=kmask)

    kl = kl_raw * tau * tau
    if not GIVEN:
        tl.store(keys_ptr + row * K + kpos, top, mask=kmask)
    tl.store(kl_ptr + row, kl)
    tl.store(completion_ptr + row, completion)
    tl.store(count_ptr + row, count)
    tl.store(risk_ptr + row, risk)
    tl.store(alpha_ptr + row, alpha)
    tl.store(row_loss_ptr + row, kl_weight * kl + harmful * alpha * completion)


def row_block_sizes(V: int, top_k: int, device: torch.device) -> tuple[int, int]:
    """(BV, K_PAD): K_PAD = next power of two ≥ k; BV a multiple of K_PAD (the merge folds BV onto K_PAD)."""
    k_pad = triton.next_power_of_2(top_k)
    if device.type == "cuda":
        bv = 2048
    else:  # interpreter: one or few chunks per row
        bv = min(8192, triton.next_power_of_2(V))
    return max(bv, k_pad), k_pad


def bft_rows(S, A, B, G, harmful, *, top_k, temperature, teacher_lambda, alpha_base, gamma, l2_reg, kl,
             grad_scale, topk_ids=None, risk=None, kl_weight=1.0) -> dict:  # fmt: skip
    """Run kernel 2 on fp32 logit blocks S, A, B of shape [n, V]; writes d(loss)/d(s)·grad_scale into G
    (any float dtype, [n, V]) unless G is None. Returns per-row kl, completion, count, risk, alpha, row_loss,
    topk_ids. ``kl_weight`` scales KL_n in row_loss and its gradient; ``kl`` is returned unweighted.

    ``topk_ids`` [n, top_k] (int32/int64, distinct ids per row) and ``risk`` [n] (fp32), given together: the
    kernel is compiled without the running top-k and the base-favored count (and without the log-sum-exps of a and
    b that the count needs) and uses them; ``count`` is then −1 and ``topk_ids`` / ``risk`` are returned as given.
    """
    n, V = S.shape
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
        _launch(S, A, B, G, harmful, out, V, top_k, temperature, teacher_lambda, alpha_base, gamma, l2_reg, kl,
                grad_scale, topk_ids, risk, kl_weight)  # fmt: skip
    keys = out.pop("topk_keys")
    if given:
        out["topk_ids"] = topk_ids.long()
        return out
    # order the k ids as the reference does: Δ descending, then id ascending (= packed key descending)
    keys = torch.sort(keys, dim=1, descending=True).values
    out["topk_ids"] = MAX_ID - (keys & MAX_ID)
    return out


def _launch(S, A, B, G, harmful, out, V, top_k, temperature, teacher_lambda, alpha_base, gamma, l2_reg, kl,
            grad_scale, topk_ids, risk, kl_weight=1.0):  # fmt: skip
    n, dev = S.shape[0], S.device
    BV, K_PAD = row_block_sizes(V, top_k, dev)
    write_grad = G is not None
    given = topk_ids is not None
    g = G if write_grad else S  # an unused pointer when no gradient is wanted
    keys = out["topk_keys"] if not given else out["count"]  # unused pointers where the kernel does not touch them
    _bft_rows_kernel[(n,)](
        S, A, B, g, harmful, topk_ids if given else out["count"], risk if given else out["risk"],
        out["kl"], out["completion"], out["count"], out["risk"], out["alpha"], out["row_loss"], keys,
        S.stride(0), g.stride(0), V,
        1.0 / temperature, float(temperature), float(teacher_lambda), float(alpha_base), float(gamma),
        float(l2_reg), float(kl_weight), float(grad_scale),
        K=top_k, K_PAD=K_PAD, BV=BV, REVERSE=(kl == "reverse"), WRITE_GRAD=write_grad, GIVEN=given,
        num_warps=8 if dev.type == "cuda" else 1,
    )  # fmt: skip
