"""The ``"triton"`` backend of :func:`bft.bft_loss`: kernels 1 and 2 over row chunks, then two gradient GEMMs.

Per chunk of C rows (C from a memory budget; three fp32 [C, V] blocks plus one [C, V] gradient block):

1. :func:`bft.kernels.bft_logits.three_logits` — S, A, B in fp32 (the only GEMMs on the frozen models, run once).
2. :func:`bft.kernels.bft_rows.bft_rows` — per-row statistics, top-k, count, and G = ∂loss/∂S (already scaled).
3. ``dH_s = G W_s`` and ``dW_s += Gᵀ H_s`` (fp32 accumulation; dW only when the student's head is trained).

So the whole forward + backward costs the 5 GEMMs of the floor (3 logit GEMMs + 2 gradient GEMMs) plus
memory-bound passes over the chunk's logits. [N, V] never exists.
"""

from __future__ import annotations

import torch

from bft.kernels.bft_logits import mm_fp32_out, three_logits
from bft.kernels.bft_rows import bft_rows
from bft.chunked import _grad_hidden as grad_hidden_sliced
from bft.reference import base_favored_density

# fp32 bytes of one [C, V] block; a chunk holds 3 of them plus the gradient block. The working set is then about
# 3.5 blocks + the fp32 dH [N, H]: at N=8192, H=4096, V=128256 (bf16) that is 0.77 GiB with a frozen student head
# (LoRA: only dH), under the 1 GiB budget. When the head trains, the fp32 dW accumulator (V·H·4 bytes, 2.1 GB
# there) dominates anyway and every chunk re-reads and re-writes it in the dW GEMM, so larger chunks pay off.
DEFAULT_BLOCK_BYTES = 192 * 2**20
DEFAULT_BLOCK_BYTES_WITH_DW = 256 * 2**20


def default_chunk_rows(N: int, V: int, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    rows = max(1, block_bytes // (4 * V))
    if rows >= 64:
        rows = rows // 64 * 64  # GEMM-friendly
    return min(max(N, 1), rows)


def _grad_hidden(G: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """G @ W with fp32 output (cuBLAS with fp32 output for 16-bit inputs; elsewhere W is upcast a vocabulary
    slice at a time, never as a whole fp32 copy of the head)."""
    out = torch.empty(G.shape[0], W.shape[1], dtype=torch.float32, device=G.device)
    if G.dtype == W.dtype and mm_fp32_out(G, W, out):
        return out
    if G.dtype == W.dtype == torch.float32:
        return torch.mm(G, W, out=out)
    return grad_hidden_sliced(G.float(), W)


def _accumulate_grad_weight(dW: torch.Tensor, G: torch.Tensor, Hs: torch.Tensor) -> None:
    """dW (fp32) += Gᵀ @ Hs."""
    if G.dtype == Hs.dtype and mm_fp32_out(G.T, Hs, dW, accumulate=True):
        return
    dW.addmm_(G.T.float(), Hs.float())


def bft_forward_backward_triton(
    sh, sw, ah, aw, bh, bw, harmful, *, params, scale: float, need_dh: bool, need_dw: bool, chunk_rows=None,
    gemm: str = "auto", grad_dtype: torch.dtype | None = None,
) -> dict:  # fmt: skip
    """Same contract as :func:`bft.chunked.bft_forward_backward_torch` (compacted, all-valid rows).

    ``grad_dtype``: dtype of the [C, V] gradient block fed to the two gradient GEMMs. Default: the input dtype on
    CUDA (16-bit tensor-core GEMMs, as Liger and CCE do), fp32 elsewhere (the CPU GEMMs upcast anyway).
    """
    N, V = sh.shape[0], sw.shape[0]
    dev = sh.device
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
    S = torch.empty(C, V, dtype=torch.float32, device=dev)
    A = torch.empty_like(S)
    B = torch.empty_like(S)
    G = torch.empty(C, V, dtype=grad_dtype, device=dev) if want_grad else None
    if sh.dtype == torch.float64:  # the kernels accumulate in fp32; fp64 inputs are rounded once, up front
        sh, sw, ah, aw, bh, bw = (x.float() for x in (sh, sw, ah, aw, bh, bw))

    out = {
        "loss_sum": torch.zeros((), dtype=torch.float32, device=dev),
        "kl": torch.empty(N, dtype=torch.float32, device=dev),
        "completion": torch.empty(N, dtype=torch.float32, device=dev),
        "risk": torch.empty(N, dtype=torch.float32, device=dev),
        "alpha": torch.empty(N, dtype=torch.float32, device=dev),
        "topk_ids": torch.empty(N, params.top_k, dtype=torch.int64, device=dev),
        "grad_hidden": torch.empty(N, sh.shape[1], dtype=torch.float32, device=dev) if need_dh else None,
        "grad_weight": torch.zeros(V, sh.shape[1], dtype=torch.float32, device=dev) if need_dw else None,
    }
    for r0 in range(0, N, C):
        r1 = min(N, r0 + C)
        n = r1 - r0
        s, a, b = S[:n], A[:n], B[:n]
        g = G[:n] if want_grad else None
        three_logits(sh[r0:r1], sw, ah[r0:r1], aw, bh[r0:r1], bw, s, a, b, gemm=gemm)
        rows = bft_rows(
            s, a, b, g, harmful_i8[r0:r1],
            top_k=params.top_k, temperature=params.temperature, teacher_lambda=params.teacher_lambda,
            alpha_base=params.alpha_base, gamma=params.gamma, l2_reg=params.l2_reg, kl=params.kl, grad_scale=scale,
        )  # fmt: skip
        out["loss_sum"] += rows["row_loss"].sum()
        out["kl"][r0:r1] = rows["kl"]
        out["completion"][r0:r1] = rows["completion"]
        out["risk"][r0:r1] = base_favored_density(rows["count"], V)
        out["alpha"][r0:r1] = rows["alpha"]
        out["topk_ids"][r0:r1] = rows["topk_ids"]
        if need_dh:
            out["grad_hidden"][r0:r1] = _grad_hidden(g, sw)
        if need_dw:
            _accumulate_grad_weight(out["grad_weight"], g, sh[r0:r1])
    return out
