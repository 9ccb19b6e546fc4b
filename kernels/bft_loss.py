"""The ``"triton"`` backend of :func:`bft.bft_loss`: kernels 1 and 2 over row chunks, then two gradient GEMMs.

Per chunk of C rows (C from a memory budget; three fp32 [C, V] blocks plus the chunk's rows of the gradient G):

1. :func:`bft.kernels.bft_logits.three_logits` — S, A, B in fp32 (the only GEMMs on the frozen models, run once).
2. :func:`bft.kernels.bft_rows.bft_rows` — per-row statistics, top-k, count, and G = ∂loss/∂S (already scaled).
3. ``dH_s = G W_s`` and ``dW_s += Gᵀ H_s`` (fp32 accumulation; dW only when the student's head is trained), once
   per group of chunks whose G is kept (one chunk without dW; see the budgets below).

So the whole forward + backward costs the 5 GEMMs of the floor (3 logit GEMMs + 2 gradient GEMMs) plus
memory-bound passes over the chunk's logits. [N, V] never exists.
"""

from __future__ import annotations

import torch

from .bft_logits import mm_fp32_out, three_logits
from .bft_rows import bft_rows
from .chunking import fused_outputs, grad_hidden_sliced, rows_per_block, store_rows

# fp32 bytes of one [C, V] logit block; a chunk holds 3 of them (S, A, B) plus its rows of the gradient block G.
#
# Frozen head (LoRA: only dH): 192 MiB blocks, G per chunk. At N=8192, H=4096, V=128256 (bf16) the working set is
# 3 blocks + G + the fp32 dH [N, H] = 0.77 GiB, under the 1 GiB budget.
#
# Head trains (dW): the fp32 dW accumulator (V·H·4 bytes, 2.1 GB there) dominates the memory anyway, and each dW
# GEMM re-reads and re-writes all of it — 16 times at 512-row chunks, about 67 GB of traffic. So G is kept for a
# *group* of chunks (512 MiB of G: 2048 rows in bf16) and dH, dW are computed once per group: 4 passes over dW
# instead of 16, with smaller logit blocks (128 MiB, 256 rows) to make room for G.
DEFAULT_BLOCK_BYTES = 192 * 2**20
DEFAULT_BLOCK_BYTES_WITH_DW = 128 * 2**20
DEFAULT_GROUP_BYTES = 512 * 2**20  # G of one group, in the gradient dtype (only when dW is computed)


def default_chunk_rows(N: int, V: int, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    rows = rows_per_block(V, block_bytes)
    if rows >= 64:
        rows = rows // 64 * 64  # GEMM-friendly
    return min(max(N, 1), rows)


def default_group_rows(
    N: int, V: int, chunk_rows: int, grad_bytes: int, need_dw: bool, group_bytes: int | None = None
) -> int:
    """Rows of G kept before the gradient GEMMs run: a whole number of chunks (just one without dW)."""
    if not need_dw:
        return chunk_rows
    budget = DEFAULT_GROUP_BYTES if group_bytes is None else group_bytes
    chunks = max(1, budget // max(1, chunk_rows * V * grad_bytes))
    return min(chunks * chunk_rows, max(chunk_rows, -(-N // chunk_rows) * chunk_rows))


def _grad_hidden(G: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """G @ W with fp32 output (cuBLAS with fp32 output for 16-bit inputs; elsewhere W is upcast a vocabulary
    slice at a time, never as a whole fp32 copy of the head)."""
    out = torch.empty(G.shape[0], W.shape[1], dtype=torch.float32, device=G.device)
    if G.dtype == W.dtype and mm_fp32_out(G, W, out):
        return out
    if G.dtype == W.dtype == torch.float32:
        return torch.mm(G, W, out=out)
    return grad_hidden_sliced(G.float(), W, out)


def _accumulate_grad_weight(dW: torch.Tensor, G: torch.Tensor, Hs: torch.Tensor) -> None:
    """dW (fp32) += Gᵀ @ Hs."""
    if G.dtype == Hs.dtype and mm_fp32_out(G.T, Hs, dW, accumulate=True):
        return
    dW.addmm_(G.T.float(), Hs.float())


def bft_forward_backward_triton(
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
    gemm: str = "auto",
    grad_dtype: torch.dtype | None = None,
    group_rows: int | None = None,
    topk_ids=None,
    risk=None,
) -> dict:
    """Same contract as :func:`bft.chunked.bft_forward_backward_torch` (compacted, all-valid rows).

    ``topk_ids`` [N, k] / ``risk`` [N] given (a teacher cache): kernel 2 runs without its running top-k and count.

    ``group_rows``: rows of G kept before the two gradient GEMMs run (a multiple of the chunk; default from
    :data:`DEFAULT_GROUP_BYTES` when dW is computed, one chunk otherwise).
    ``grad_dtype``: dtype of the [C, V] gradient block fed to the two gradient GEMMs. Default: the input dtype on
    CUDA (16-bit tensor-core GEMMs, as Liger and CCE do), fp32 elsewhere (the CPU GEMMs upcast anyway).
    """
    N, V = sh.shape[0], sw.shape[0]
    dev = sh.device
    if params.selection != "vocab" and topk_ids is None:
        raise ValueError(
            f"selection={params.selection!r} needs precomputed top-k ids on the triton backend (its row "
            "kernel ranks the whole vocabulary): call bft.bft_loss (which computes them), build a "
            "teacher cache (bft cache) or pass topk_ids= and risk="
        )
    if dev.type != "cuda":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is "
                "imported (slow; for tests). Use backend='torch' on CPU."
            )
    sh, sw, ah, aw, bh, bw = (x.contiguous() for x in (sh, sw, ah, aw, bh, bw))
    harmful_i8 = harmful.to(torch.int8).contiguous()
    C = chunk_rows or default_chunk_rows(N, V, DEFAULT_BLOCK_BYTES_WITH_DW if need_dw else DEFAULT_BLOCK_BYTES)
    C = max(1, min(C, max(N, 1)))
    want_grad = need_dh or need_dw
    if grad_dtype is None:
        grad_dtype = sh.dtype if (dev.type == "cuda" and sh.dtype != torch.float64) else torch.float32
    group = group_rows or default_group_rows(N, V, C, torch.finfo(grad_dtype).bits // 8, need_dw)
    group = max(C, group // C * C)  # whole chunks: each chunk's rows of G lie inside one group
    S = torch.empty(C, V, dtype=torch.float32, device=dev)
    A = torch.empty_like(S)
    B = torch.empty_like(S)
    G = torch.empty(min(group, max(N, 1)), V, dtype=grad_dtype, device=dev) if want_grad else None
    if sh.dtype == torch.float64:  # the kernels accumulate in fp32; fp64 inputs are rounded once, up front
        sh, sw, ah, aw, bh, bw = (x.float() for x in (sh, sw, ah, aw, bh, bw))

    out = fused_outputs(N, V, sh.shape[1], params.top_k, torch.float32, dev, need_dh=need_dh, need_dw=need_dw)
    g0 = 0  # first row of the current group of G
    for r0 in range(0, N, C):
        r1 = min(N, r0 + C)
        n = r1 - r0
        s, a, b = S[:n], A[:n], B[:n]
        g = G[r0 - g0 : r1 - g0] if want_grad else None
        three_logits(sh[r0:r1], sw, ah[r0:r1], aw, bh[r0:r1], bw, s, a, b, gemm=gemm)
        rows = bft_rows(
            s,
            a,
            b,
            g,
            harmful_i8[r0:r1],
            params=params,
            grad_scale=scale,
            topk_ids=None if topk_ids is None else topk_ids[r0:r1],
            risk=None if risk is None else risk[r0:r1],
        )
        store_rows(out, rows, r0, r1)
        if want_grad and (r1 - g0 == G.shape[0] or r1 == N):  # the group is full (or the rows end): its GEMMs
            g_group = G[: r1 - g0]
            if need_dh:
                out["grad_hidden"][g0:r1] = _grad_hidden(g_group, sw)
            if need_dw:
                _accumulate_grad_weight(out["grad_weight"], g_group, sh[g0:r1])
            g0 = r1
    return out
